from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_STATE_UNSPECIFIED: _ClassVar[SessionState]
    SESSION_STATE_SAMPLING: _ClassVar[SessionState]
    SESSION_STATE_FINISHED: _ClassVar[SessionState]
    SESSION_STATE_FAILED: _ClassVar[SessionState]
SESSION_STATE_UNSPECIFIED: SessionState
SESSION_STATE_SAMPLING: SessionState
SESSION_STATE_FINISHED: SessionState
SESSION_STATE_FAILED: SessionState

class AgentReport(_message.Message):
    __slots__ = ("hello", "session")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    hello: AgentHello
    session: SessionReport
    def __init__(self, hello: _Optional[_Union[AgentHello, _Mapping]] = ..., session: _Optional[_Union[SessionReport, _Mapping]] = ...) -> None: ...

class AgentHello(_message.Message):
    __slots__ = ("node", "agent_id")
    NODE_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    node: str
    agent_id: str
    def __init__(self, node: _Optional[str] = ..., agent_id: _Optional[str] = ...) -> None: ...

class SessionReport(_message.Message):
    __slots__ = ("session_id", "state", "samples", "processes", "message")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    state: SessionState
    samples: int
    processes: int
    message: str
    def __init__(self, session_id: _Optional[str] = ..., state: _Optional[_Union[SessionState, str]] = ..., samples: _Optional[int] = ..., processes: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class AgentOrder(_message.Message):
    __slots__ = ("start_session",)
    START_SESSION_FIELD_NUMBER: _ClassVar[int]
    start_session: SessionOrder
    def __init__(self, start_session: _Optional[_Union[SessionOrder, _Mapping]] = ...) -> None: ...

class SessionOrder(_message.Message):
    __slots__ = ("session_id", "job", "events", "frequency", "deadline_unix_ms")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    job: str
    events: _containers.RepeatedScalarFieldContainer[str]
    frequency: int
    deadline_unix_ms: int
    def __init__(self, session_id: _Optional[str] = ..., job: _Optional[str] = ..., events: _Optional[_Iterable[str]] = ..., frequency: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ...) -> None: ...

class StartSessionRequest(_message.Message):
    __slots__ = ("job", "duration_s", "frequency", "events")
    JOB_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    job: str
    duration_s: int
    frequency: int
    events: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job: _Optional[str] = ..., duration_s: _Optional[int] = ..., frequency: _Optional[int] = ..., events: _Optional[_Iterable[str]] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "deadline_unix_ms", "agents")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    deadline_unix_ms: int
    agents: int
    def __init__(self, session_id: _Optional[str] = ..., deadline_unix_ms: _Optional[int] = ..., agents: _Optional[int] = ...) -> None: ...

class WatchSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class NodeProgress(_message.Message):
    __slots__ = ("node", "state", "samples", "processes")
    NODE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    node: str
    state: SessionState
    samples: int
    processes: int
    def __init__(self, node: _Optional[str] = ..., state: _Optional[_Union[SessionState, str]] = ..., samples: _Optional[int] = ..., processes: _Optional[int] = ...) -> None: ...

class SessionProgress(_message.Message):
    __slots__ = ("nodes", "deadline_unix_ms", "done")
    NODES_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeProgress]
    deadline_unix_ms: int
    done: bool
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeProgress, _Mapping]]] = ..., deadline_unix_ms: _Optional[int] = ..., done: _Optional[bool] = ...) -> None: ...
