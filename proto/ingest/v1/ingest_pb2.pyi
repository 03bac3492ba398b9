from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class IngestBatch(_message.Message):
    __slots__ = ("agent_id", "sequence", "schema_version", "node", "samples", "stacks", "processes", "io_latency", "incarnation")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STACKS_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    IO_LATENCY_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    sequence: int
    schema_version: int
    node: str
    samples: bytes
    stacks: bytes
    processes: bytes
    io_latency: bytes
    incarnation: str
    def __init__(self, agent_id: _Optional[str] = ..., sequence: _Optional[int] = ..., schema_version: _Optional[int] = ..., node: _Optional[str] = ..., samples: _Optional[bytes] = ..., stacks: _Optional[bytes] = ..., processes: _Optional[bytes] = ..., io_latency: _Optional[bytes] = ..., incarnation: _Optional[str] = ...) -> None: ...

class IngestAck(_message.Message):
    __slots__ = ("sequence", "duplicate", "rows_stored")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ROWS_STORED_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    duplicate: bool
    rows_stored: int
    def __init__(self, sequence: _Optional[int] = ..., duplicate: _Optional[bool] = ..., rows_stored: _Optional[int] = ...) -> None: ...

class SqlRequest(_message.Message):
    __slots__ = ("sql", "timeout_ms")
    SQL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    sql: str
    timeout_ms: int
    def __init__(self, sql: _Optional[str] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class ArrowChunk(_message.Message):
    __slots__ = ("ipc",)
    IPC_FIELD_NUMBER: _ClassVar[int]
    ipc: bytes
    def __init__(self, ipc: _Optional[bytes] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("node", "agent_id", "since_unix_ms", "until_unix_ms")
    NODE_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UNTIL_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    node: str
    agent_id: str
    since_unix_ms: int
    until_unix_ms: int
    def __init__(self, node: _Optional[str] = ..., agent_id: _Optional[str] = ..., since_unix_ms: _Optional[int] = ..., until_unix_ms: _Optional[int] = ...) -> None: ...

class DeleteReply(_message.Message):
    __slots__ = ("samples", "processes", "io_latency", "sealed_files_kept")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    IO_LATENCY_FIELD_NUMBER: _ClassVar[int]
    SEALED_FILES_KEPT_FIELD_NUMBER: _ClassVar[int]
    samples: int
    processes: int
    io_latency: int
    sealed_files_kept: int
    def __init__(self, samples: _Optional[int] = ..., processes: _Optional[int] = ..., io_latency: _Optional[int] = ..., sealed_files_kept: _Optional[int] = ...) -> None: ...
