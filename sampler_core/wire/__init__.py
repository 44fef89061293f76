"""The gRPC layer: proto <-> dataclass conversion (``convert``), the server (``server``), the
accounts store (``accounts``) and the transport ``Client`` uses (``transport``).

The only package that imports grpc; the generated code lives in ``_generated`` (``make protos``).
"""
