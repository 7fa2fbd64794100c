"""gRPC bindings for the LocalAI backend protocol (proto package ``backend``).

``backend_pb2`` and ``backend_pb2_grpc`` are generated from ``protos/backend.proto`` by
``protos/generate.sh`` and committed; they import on protobuf runtimes from 4.21 (Debian 12)
to 7.x. Import them explicitly::

    from modeld.rpc import backend_pb2, backend_pb2_grpc

``modeld.rpc.client`` is modeld's client of one backend: ``backend_pb2`` messages over
``modeld.rpc.http2``, a lean gRPC-over-HTTP/2 client (unary and server-streaming calls on
serialized messages). The daemon never imports grpcio (``backend_pb2_grpc`` needs it: the
backends' side); ``backend_pb2`` needs only protobuf.

This package imports nothing itself, so ``import modeld.rpc`` stays cheap.
"""
