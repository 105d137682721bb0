from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetLatestVersionRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("version", "total_bytes", "num_tensors", "checksum", "available_versions")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    version: int
    total_bytes: int
    num_tensors: int
    checksum: str
    available_versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, version: _Optional[int] = ..., total_bytes: _Optional[int] = ..., num_tensors: _Optional[int] = ..., checksum: _Optional[str] = ..., available_versions: _Optional[_Iterable[int]] = ...) -> None: ...

class StreamWeightsRequest(_message.Message):
    __slots__ = ("version", "chunk_bytes", "base_version", "base_checksum", "encodings", "wire_format")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    WIRE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    version: int
    chunk_bytes: int
    base_version: int
    base_checksum: str
    encodings: _containers.RepeatedScalarFieldContainer[str]
    wire_format: int
    def __init__(self, version: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., base_version: _Optional[int] = ..., base_checksum: _Optional[str] = ..., encodings: _Optional[_Iterable[str]] = ..., wire_format: _Optional[int] = ...) -> None: ...

class WeightChunk(_message.Message):
    __slots__ = ("version", "requested_version", "name", "dtype", "shape", "offset", "tensor_bytes", "data", "tensor_index", "num_tensors", "final", "checksum", "encoding", "base_version", "encoded_bytes", "wire_format")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TENSOR_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TENSOR_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENCODED_BYTES_FIELD_NUMBER: _ClassVar[int]
    WIRE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    version: int
    requested_version: int
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    tensor_bytes: int
    data: bytes
    tensor_index: int
    num_tensors: int
    final: bool
    checksum: str
    encoding: str
    base_version: int
    encoded_bytes: int
    wire_format: int
    def __init__(self, version: _Optional[int] = ..., requested_version: _Optional[int] = ..., name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., tensor_bytes: _Optional[int] = ..., data: _Optional[bytes] = ..., tensor_index: _Optional[int] = ..., num_tensors: _Optional[int] = ..., final: _Optional[bool] = ..., checksum: _Optional[str] = ..., encoding: _Optional[str] = ..., base_version: _Optional[int] = ..., encoded_bytes: _Optional[int] = ..., wire_format: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("serving", "latest_version", "uptime_s")
    SERVING_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    serving: bool
    latest_version: int
    uptime_s: float
    def __init__(self, serving: _Optional[bool] = ..., latest_version: _Optional[int] = ..., uptime_s: _Optional[float] = ...) -> None: ...
