"""The gRPC Open Inference Protocol's messages (Triton's `inference` package), built
from the vendored .proto files' descriptors (`_descriptors.py`).

They live in a private descriptor pool, not protobuf's default one: a process that
also imports tritonclient.grpc (the tests, a client beside ingress) registers the
same `inference.*` names from its own, possibly newer, copy of the protocol, and two
definitions of one name in the default pool are an import-time error.

Message classes are built at run time, so to mypy they are Any.
"""

from __future__ import annotations

from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import ServiceDescriptor

from services.ingress.proto._descriptors import FILE_DESCRIPTOR_SET

SERVICE: Final = "inference.GRPCInferenceService"

_pool = descriptor_pool.DescriptorPool()
for _file in descriptor_pb2.FileDescriptorSet.FromString(FILE_DESCRIPTOR_SET).file:
    _pool.Add(_file)


def message(name: str) -> Any:
    """The class of message `inference.<name>`."""
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"inference.{name}"))


def service() -> ServiceDescriptor:
    return _pool.FindServiceByName(SERVICE)
