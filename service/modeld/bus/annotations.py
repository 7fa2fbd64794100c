"""What org.modeld1's introspection data says beyond what dbus-next generates.

dbus-next (0.2.3) writes no annotations and leaves out arguments unnamed. :func:`describe`
adds to an interface's introspection data the ``EmitsChangedSignal`` annotation of every
property whose changes are not simply sent with their values (:data:`api.CHANGES`; the
default needs none), and the argument names of :data:`api.ARG_NAMES`, so that caching
clients (GDBus proxies), ``busctl introspect`` and generated bindings read them. It builds
new objects: dbus-next's own, shared by every instance of an interface class, stay as they are.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence

from modeld.bus import api
from modeld.bus.connection import introspection as intr


class AnnotatedProperty(intr.Property):
    """A property whose XML carries ``<annotation>`` elements."""

    def __init__(self, prop: intr.Property, annotations: Mapping[str, str]) -> None:
        super().__init__(prop.name, prop.signature, prop.access)
        self.annotations = dict(annotations)

    def to_xml(self) -> ET.Element:
        element = super().to_xml()
        for name, value in self.annotations.items():
            ET.SubElement(element, "annotation", name=name, value=value)
        return element


def _property(prop: intr.Property, changes: api.Changes) -> intr.Property:
    if changes is api.Changes.EMITS:
        return prop
    return AnnotatedProperty(prop, {api.EMITS_CHANGED_SIGNAL: str(changes)})


def _named(member: str, args: Sequence[intr.Arg], names: Sequence[str] | None) -> list[intr.Arg]:
    if names is None:
        return list(args)
    if len(names) != len(args):
        raise ValueError(f"{member}: {len(names)} argument names for {len(args)} arguments")
    return [intr.Arg(a.signature, a.direction, n) for a, n in zip(args, names, strict=True)]


def describe(spec: intr.Interface) -> intr.Interface:
    """``spec`` (dbus-next's introspection data of an org.modeld1 interface), completed.

    Raises KeyError for a property :data:`api.CHANGES` does not list: every property's
    changes are decided, none is left to the default by omission.
    """
    changes = api.CHANGES[spec.name]
    names = api.ARG_NAMES.get(spec.name, {})
    return intr.Interface(
        spec.name,
        methods=[
            intr.Method(m.name, list(m.in_args), _named(m.name, m.out_args, names.get(m.name)))
            for m in spec.methods
        ],
        signals=[
            intr.Signal(s.name, _named(s.name, s.args, names.get(s.name))) for s in spec.signals
        ],
        properties=[_property(p, changes[p.name]) for p in spec.properties],
    )
