"""gRPC bindings for the LocalAI backend protocol (proto package ``backend``).

``backend_pb2`` and ``backend_pb2_grpc`` are generated from ``protos/backend.proto`` by
``protos/generate.sh`` and committed; they import on protobuf runtimes from 4.21 (Debian 12)
to 7.x. Import them explicitly::

    from modeld.rpc import backend_pb2, backend_pb2_grpc

``modeld.rpc.client`` is modeld's client of one backend over these bindings.
``modeld.rpc.http2`` is a lean gRPC-over-HTTP/2 client (unary and server-streaming calls
on serialized messages) for the request path, where grpc.aio's per-message cost shows.

This package imports nothing itself, so ``import modeld.rpc`` stays cheap.
"""
