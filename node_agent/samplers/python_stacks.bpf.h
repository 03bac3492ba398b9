// Python stacks, read from the interpreter's own structures (as py-spy and the
// OpenTelemetry profiler do): no flag or agent in the profiled process.
//
// User space (symbolize/python.py) puts every CPython process in python_procs with the
// structure offsets of its interpreter build. Here the current thread's PyThreadState is
// found in the interpreter's thread list by its thread_id, which is pthread_self(): the
// thread's fs base on x86-64 (cached per thread, checked at every sample). Its frames are
// then followed to the outermost: PyFrameObject.f_back up to 3.10,
// _PyInterpreterFrame.previous from 3.11. Each frame is recorded as its code object's
// address, the instruction it is at and a tag of the code object's fields (so user space
// tells a freed and reused address from the code that was sampled), leaf first, in
// python_stacks_<g> keyed by a hash.
//
// Frames flagged PY_ENTRY are the outermost of one _PyEval_EvalFrameDefault call: every
// frame up to 3.10, `is_entry` ones in 3.11, those just above a C-stack shim frame from
// 3.12. User space replaces the native eval frames by these groups, in order.
#define PY_FRAMES 128         // deepest Python stack kept (leaf side); a power of two
#define PY_THREADS 256        // threads looked at to find the current one's state
#define PY_FRAME_WINDOW 128   // bytes read of a frame: every field used lies within
#define PY_CODE_WINDOW 32     // bytes read of a code object for its tag
#define PY_ENTRY 0x80000000U  // py_frame_t.instr: outermost frame of an eval call
#define PY_NO_FIELD 0xffff
#define PY_OWNED_BY_CSTACK 3  // _PyInterpreterFrame.owner of 3.12+ shim frames
#define PY_RETRY_WALK 64      // a thread not found is looked for again after this many samples

// sample_key_t.python_stack values that are not hashes.
#define PYTHON_STACK_NONE 0  // not a Python thread (or not walkable): nothing lost
#define PYTHON_STACK_LOST 1  // the stack map was full, or outlived a drain

// How the frames of an interpreter build are told apart (py_proc_t.style).
#define PY_STYLE_FRAME_OBJECTS 0  // up to 3.10: PyFrameObject, one per eval call
#define PY_STYLE_IS_ENTRY 1       // 3.11: _PyInterpreterFrame.is_entry
#define PY_STYLE_SHIM 2           // 3.12+: a shim frame below each eval call's first

// One interpreter build's layout, in one process (python.py packs it: keep them equal).
struct py_proc_t {
    u64 interpreters_head;  // address of _PyRuntime.interpreters.head
    u16 interp_threads_head;
    u16 tstate_next;
    u16 tstate_thread_id;
    u16 tstate_frame;           // the frame, or the _PyCFrame holding it (3.11, 3.12)
    u16 cframe_current_frame;   // PY_NO_FIELD: tstate_frame is the frame
    u16 frame_previous;
    u16 frame_code;
    u16 frame_instr;            // f_lasti (int), prev_instr or instr_ptr (pointers)
    u16 frame_owner;            // PY_NO_FIELD: none
    u16 frame_is_entry;         // PY_NO_FIELD: none
    u16 code_instructions;      // co_code_adaptive; PY_NO_FIELD: frame_instr is f_lasti
    u16 code_window;            // where the tag's fields are read from
    u16 code_tag_a;             // co_firstlineno, from code_window
    u16 code_tag_b;             // co_argcount, from code_window
    u16 style;
    u16 pad;
};

struct py_frame_t {
    u64 code;   // PyCodeObject address
    u32 instr;  // instruction offset (code units; bytes up to 3.9), | PY_ENTRY
    u32 tag;    // co_firstlineno ^ co_argcount << 20: what user space checks
};

struct py_stack_t {
    u64 depth;  // | PY_TRUNCATED if deeper frames were left out
    struct py_frame_t frames[PY_FRAMES];  // leaf first
};
#define PY_TRUNCATED (1ULL << 63)

// Scratch space of one walk. The walk's state is kept here rather than in registers: map
// memory is not tracked value by value by the verifier, so the paths through each
// iteration converge instead of multiplying.
struct py_scratch_t {
    u8 frame[PY_FRAME_WINDOW + 8];
    u8 code[PY_CODE_WINDOW + 8];
    u64 next;   // the next frame (or thread state) to read
    u64 hash;
    u64 depth;
    struct py_stack_t stack;
};

struct py_thread_t {
    u64 tstate;  // 0: not found (retry after `retry` samples)
    u64 fsbase;  // the thread's fs base when found
    u32 retry;
    u32 pad;
};

BPF_HASH(python_procs, u32, struct py_proc_t, 4096);
// Forked children walked with their parent's layout: child -> parent. User space names
// the code of a child that exited before it looked at it from this parent.
BPF_TABLE("lru_hash", u32, u32, python_forks, 4096);
BPF_TABLE("lru_hash", u32, struct py_thread_t, python_threads, 16384);
BPF_PERCPU_ARRAY(python_scratch, struct py_scratch_t, 1);
BPF_F_TABLE("hash", u64, struct py_stack_t, python_stacks_0, MAX_STACKS, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", u64, struct py_stack_t, python_stacks_1, MAX_STACKS, BPF_F_NO_PREALLOC);
// Walks of Python processes' threads, by outcome (PY_STAT_*): user space reports them.
BPF_PERCPU_ARRAY(python_walks, u64, 4);
#define PY_STAT_WALKED 0      // a stack recorded
#define PY_STAT_NO_THREAD 1   // no thread state for the thread (not a Python thread, yet)
#define PY_STAT_UNREADABLE 2  // a read of the interpreter's memory failed
#define PY_STAT_TRUNCATED 3   // deeper than PY_FRAMES

// A value at `offset` of a window read into scratch memory; the mask keeps the verifier
// sure it stays inside (offsets come from a map).
#define PY_FIELD(type, window, size, offset) \
    (*(type *)((window) + ((offset) & ((size) - 1))))

static __always_inline u64 py_read_word(u64 address)
{
    u64 value = 0;
    bpf_probe_read_user(&value, sizeof(value), (void *)address);
    return value;
}

static __always_inline void py_count(u32 stat)
{
    python_walks.increment(stat);
}

// The current thread's fs base (its pthread_self()); 0 if the kernel's layout is unknown.
static __always_inline u64 current_fsbase(void)
{
#if TASK_FSBASE_OFFSET >= 0
    u64 fsbase = 0;
    bpf_probe_read_kernel(&fsbase, sizeof(fsbase),
                          (void *)bpf_get_current_task() + TASK_FSBASE_OFFSET);
    return fsbase;
#else
    return 0;
#endif
}

// The layout of the current process's interpreter: its own, or if it is a child forked by
// a Python process and has not exec'd since (multiprocessing, PySpark's workers), its
// parent's, until user space finds the child itself.
static __always_inline struct py_proc_t *current_python(u32 pid)
{
    struct py_proc_t *proc = python_procs.lookup(&pid);
#if TASK_FSBASE_OFFSET >= 0
    void *task = (void *)bpf_get_current_task(), *parent = 0;
    u32 parent_pid = 0, exec_id = 0, parent_exec_id = 1;

    if (proc)
        return proc;
    bpf_probe_read_kernel(&parent, sizeof(parent), task + TASK_REAL_PARENT_OFFSET);
    if (!parent)
        return 0;
    bpf_probe_read_kernel(&parent_pid, sizeof(parent_pid), parent + TASK_TGID_OFFSET);
    bpf_probe_read_kernel(&exec_id, sizeof(exec_id), task + TASK_SELF_EXEC_ID_OFFSET);
    bpf_probe_read_kernel(&parent_exec_id, sizeof(parent_exec_id),
                          parent + TASK_SELF_EXEC_ID_OFFSET);
    if (parent_pid == pid || exec_id != parent_exec_id)
        return 0;
    proc = python_procs.lookup(&parent_pid);
    if (proc)
        python_forks.update(&pid, &parent_pid);
#endif
    return proc;
}

// The current thread's PyThreadState, or 0.
static __always_inline u64 current_tstate(struct py_proc_t *proc, struct py_scratch_t *scratch,
                                          u32 tid, u64 fsbase)
{
    struct py_thread_t *known = python_threads.lookup(&tid), found = {.fsbase = fsbase};
    u64 tstate;

    if (known && known->fsbase == fsbase) {
        if (known->tstate && py_read_word(known->tstate + proc->tstate_thread_id) == fsbase)
            return known->tstate;
        if (!known->tstate && known->retry) {
            known->retry--;
            return 0;
        }
    }
    tstate = py_read_word(proc->interpreters_head);
    scratch->next = tstate ? py_read_word(tstate + proc->interp_threads_head) : 0;
    scratch->depth = 0;  // the thread state found
    for (int i = 0; i < PY_THREADS; i++) {
        tstate = scratch->next;
        if (!tstate)
            break;
        if (py_read_word(tstate + proc->tstate_thread_id) == fsbase) {
            scratch->depth = tstate;
            break;
        }
        scratch->next = py_read_word(tstate + proc->tstate_next);
    }
    tstate = scratch->depth;
    found.tstate = tstate;
    found.retry = tstate ? 0 : PY_RETRY_WALK;
    python_threads.update(&tid, &found);
    return tstate;
}

// Walk the current thread's Python frames into python_stacks_<at & 1>; returns the
// stack's hash, or PYTHON_STACK_NONE / PYTHON_STACK_LOST.
static __always_inline u64 record_python_stack(u32 at)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32, tid = (u32)pid_tgid, zero = 0;
    struct py_proc_t *proc = current_python(pid);
    struct py_scratch_t *scratch;
    u64 hash;
    u64 fsbase, tstate, frame, depth;

    if (!proc)
        return PYTHON_STACK_NONE;
    scratch = python_scratch.lookup(&zero);
    fsbase = current_fsbase();
    if (!scratch || !fsbase)
        return PYTHON_STACK_NONE;
    tstate = current_tstate(proc, scratch, tid, fsbase);
    if (!tstate) {
        py_count(PY_STAT_NO_THREAD);
        return PYTHON_STACK_NONE;
    }
    frame = py_read_word(tstate + proc->tstate_frame);
    if (proc->cframe_current_frame != PY_NO_FIELD && frame)
        frame = py_read_word(frame + proc->cframe_current_frame);
    scratch->next = frame;
    scratch->hash = 0xcbf29ce484222325ULL;
    scratch->depth = 0;
    scratch->stack.depth = 0;
    for (int i = 0; i < PY_FRAMES + 8; i++) {
        u64 code, instr;
        u32 flags = 0;
        frame = scratch->next;
        if (!frame)
            break;
        if (bpf_probe_read_user(scratch->frame, PY_FRAME_WINDOW, (void *)frame)) {
            py_count(PY_STAT_UNREADABLE);
            break;
        }
        scratch->next = PY_FIELD(u64, scratch->frame, PY_FRAME_WINDOW, proc->frame_previous);
        code = PY_FIELD(u64, scratch->frame, PY_FRAME_WINDOW, proc->frame_code);
        depth = scratch->depth;
        if (proc->style == PY_STYLE_SHIM &&
            PY_FIELD(u8, scratch->frame, PY_FRAME_WINDOW, proc->frame_owner) ==
                PY_OWNED_BY_CSTACK) {
            // The frame below an eval call's first: that one (recorded last) is its entry.
            if (depth)
                scratch->stack.frames[(depth - 1) & (PY_FRAMES - 1)].instr |= PY_ENTRY;
            continue;
        }
        if (depth >= PY_FRAMES) {
            scratch->stack.depth = PY_TRUNCATED;
            py_count(PY_STAT_TRUNCATED);
            break;
        }
        if (proc->code_instructions == PY_NO_FIELD) {
            instr = PY_FIELD(u32, scratch->frame, PY_FRAME_WINDOW, proc->frame_instr);
        } else {
            instr = PY_FIELD(u64, scratch->frame, PY_FRAME_WINDOW, proc->frame_instr);
            instr = instr > code + proc->code_instructions
                        ? (instr - code - proc->code_instructions) / 2
                        : 0;
        }
        if (proc->style == PY_STYLE_FRAME_OBJECTS ||
            (proc->style == PY_STYLE_IS_ENTRY &&
             PY_FIELD(u8, scratch->frame, PY_FRAME_WINDOW, proc->frame_is_entry)))
            flags = PY_ENTRY;
        struct py_frame_t *out = &scratch->stack.frames[depth & (PY_FRAMES - 1)];
        out->code = code;
        out->instr = (instr & ~PY_ENTRY) | flags;
        out->tag = 0;
        if (!bpf_probe_read_user(scratch->code, PY_CODE_WINDOW, (void *)(code + proc->code_window)))
            out->tag = PY_FIELD(u32, scratch->code, PY_CODE_WINDOW, proc->code_tag_a) ^
                       PY_FIELD(u32, scratch->code, PY_CODE_WINDOW, proc->code_tag_b) << 20;
        scratch->hash = ((scratch->hash ^ code) * 0x100000001b3ULL ^ out->instr) * 0x100000001b3ULL;
        scratch->depth = depth + 1;
    }
    depth = scratch->depth;
    if (!depth)
        return PYTHON_STACK_NONE;
    py_count(PY_STAT_WALKED);
    scratch->stack.depth |= depth;
    hash = scratch->hash | 2;  // never PYTHON_STACK_NONE or PYTHON_STACK_LOST
    // BCC resolves map names at compile time, so each generation is spelled out.
    if (at & 1) {
        if (!python_stacks_1.lookup(&hash))
            python_stacks_1.insert(&hash, &scratch->stack);
        if (!python_stacks_1.lookup(&hash))
            return PYTHON_STACK_LOST;
    } else {
        if (!python_stacks_0.lookup(&hash))
            python_stacks_0.insert(&hash, &scratch->stack);
        if (!python_stacks_0.lookup(&hash))
            return PYTHON_STACK_LOST;
    }
    return hash;
}
