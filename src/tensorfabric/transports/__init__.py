"""Transports: the fabrics the engine moves bytes over."""

from ._base import InboundHandler, Transport
from ._shm import ShmTransport
from ._tcp import TcpTransport

__all__ = ["InboundHandler", "ShmTransport", "TcpTransport", "Transport"]
