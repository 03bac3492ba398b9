// HotSpot JVMs' compiled and interpreted Java frames, unwound without frame pointers (a JVM
// started with no flags), as the OpenTelemetry eBPF profiler does it (hotspot_tracer.ebpf.c).
//
// The user stack walk (user_stacks.bpf.h) calls jit_unwind_step(state, pid) for a frame whose
// ip lies in no file-backed mapping with unwind rows; it returns 1 with `state` set to the
// caller's frame, or 0 to let the frame-pointer step run. It needs `struct frame_state_t
// { u64 ip; u64 sp; u64 fp; }` declared before it.
//
// Per JVM, user space (symbolize/hotspot.py, HotSpotProcess.unwind_info) puts in hotspot_jvms
// the bounds of its code cache, of its template interpreter and of each code heap with its
// segment map, and the offsets of the CodeBlob fields read here (from gHotSpotVMStructs).
//
// - Compiled code: the code blob holding ip is found through its heap's segment map; a blob
//   with a frame size (nmethods, runtime stubs) ends its frame at sp + frame size, the return
//   address and the caller's saved rbp just below. In the prologue or the leaf's epilogue
//   less is on the stack. Blobs without one (StubRoutines) keep rbp: the frame-pointer step.
// - Interpreted code keeps rbp; its frame holds the Method* at rbp - 3 words and the caller's
//   sp at rbp - 1 (frame_x86.hpp). The step records the Method* as a frame of its own after
//   the interpreter's ip (sp = rbp + 8 marks it), which user space names; the next step,
//   given that word, moves on to the caller.
#define HOTSPOT_HEAPS 4             // code heaps: non-nmethods, profiled, non-profiled
#define HOTSPOT_SEGMAP_HOPS 16      // a segment map's hops from any segment to its block
#define HOTSPOT_RA_SLOTS 6          // words past the frame C2 code may have pushed
#define HOTSPOT_MAX_FRAME 65536     // bytes: a frame size beyond this is not believed

struct hotspot_jvm_t {
    u64 code_low;  // CodeCache::_low_bound, _high_bound
    u64 code_high;
    u64 interpreter_low;  // AbstractInterpreter::_code: its stub buffer
    u64 interpreter_high;
    u64 heap_low[HOTSPOT_HEAPS];  // CodeHeap::_memory's reserved bounds
    u64 heap_high[HOTSPOT_HEAPS];
    u64 segmap[HOTSPOT_HEAPS];  // CodeHeap::_segmap's low bound
    u32 segment_shift;  // CodeHeap::_log2_segment_size
    u32 heap_block;  // sizeof(HeapBlock): the blob follows its block's header
    u32 frame_size;  // offset of CodeBlob::_frame_size (int, words)
    u32 frame_complete;  // offset of CodeBlob::_frame_complete_offset (int or short)
    u32 code_begin;  // offset of CodeBlob::_code_begin (pointer), or _code_offset (int)
    u32 code_offset;  // 1 if code_begin is an offset from the blob (JDK 23+)
};
BPF_HASH(hotspot_jvms, u32, struct hotspot_jvm_t, 256);

// The steps below, counted per CPU (user space reads them as hotspot_steps[kind]).
#define HOTSPOT_STEP_COMPILED 0
#define HOTSPOT_STEP_INTERPRETED 1
#define HOTSPOT_STEP_METHOD 2
#define HOTSPOT_STEP_STUB 3      // no frame size: left to the frame-pointer step
#define HOTSPOT_STEP_NO_BLOB 4   // ip in the code cache but in no block (freed, or a torn map)
#define HOTSPOT_STEP_BAD_RETURN 5  // no return address into Java code where one must be
#define HOTSPOT_STEPS 6
BPF_PERCPU_ARRAY(hotspot_steps, u64, HOTSPOT_STEPS);

static __always_inline void hotspot_count(u32 step)
{
    u64 *count = hotspot_steps.lookup(&step);
    if (count)
        (*count)++;
}

static __always_inline u64 hotspot_word(u64 address)
{
    u64 value = 0;
    bpf_probe_read_user(&value, sizeof(value), (void *)address);
    return value;
}

static __always_inline bool hotspot_in_code(struct hotspot_jvm_t *jvm, u64 address)
{
    return address >= jvm->code_low && address < jvm->code_high;
}

// The CodeBlob whose heap block holds ip, or 0.
static __always_inline u64 hotspot_blob(struct hotspot_jvm_t *jvm, u64 ip)
{
    u64 low = 0, segmap = 0, segment;
    u8 tag = 0xff;

#pragma unroll
    for (int i = 0; i < HOTSPOT_HEAPS; i++) {
        if (ip >= jvm->heap_low[i] && ip < jvm->heap_high[i]) {
            low = jvm->heap_low[i];
            segmap = jvm->segmap[i];
        }
    }
    if (!low)
        return 0;
    segment = (ip - low) >> (jvm->segment_shift & 31);
    // Each segment's byte says how many segments back to go; 0 marks a block's first,
    // 0xff a free one (heap.cpp).
    for (int i = 0; i < HOTSPOT_SEGMAP_HOPS; i++) {
        if (bpf_probe_read_user(&tag, sizeof(tag), (void *)(segmap + segment)))
            return 0;
        if (tag == 0 || tag == 0xff || tag > segment)
            break;
        segment -= tag;
    }
    if (tag != 0)
        return 0;
    return low + (segment << (jvm->segment_shift & 31)) + jvm->heap_block;
}

// Whether state is the sampled thread's innermost frame (its registers), where code may
// stop anywhere, in an epilogue too; callers are always at a call.
static __always_inline bool hotspot_leaf(struct frame_state_t *state)
{
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    u64 sp = 0;
    bpf_probe_read_kernel(&sp, sizeof(sp), &regs->sp);
    return sp == state->sp;
}

static __always_inline int hotspot_caller(struct frame_state_t *state, u64 ip, u64 sp, u64 fp)
{
    if (sp <= state->sp)
        return 0;  // frames only go up the stack
    state->ip = ip;
    state->sp = sp;
    state->fp = fp;
    return 1;
}

static __always_inline int hotspot_compiled(struct frame_state_t *state,
                                            struct hotspot_jvm_t *jvm)
{
    u64 ip = state->ip, sp = state->sp, blob = hotspot_blob(jvm, ip), begin = 0;
    u32 frame_size = 0;
    u16 complete = 0;
    u8 code[2] = {};

    if (!blob) {
        hotspot_count(HOTSPOT_STEP_NO_BLOB);
        return 0;
    }
    if (bpf_probe_read_user(&frame_size, sizeof(frame_size), (void *)(blob + jvm->frame_size)) ||
        bpf_probe_read_user(&complete, sizeof(complete), (void *)(blob + jvm->frame_complete)) ||
        bpf_probe_read_user(&begin, jvm->code_offset ? 4 : 8, (void *)(blob + jvm->code_begin)))
        return 0;
    if (jvm->code_offset)
        begin += blob;
    frame_size *= 8;
    if (!frame_size || frame_size > HOTSPOT_MAX_FRAME) {
        hotspot_count(HOTSPOT_STEP_STUB);
        return 0;
    }
    if (complete != 0xffff && ip < begin + complete) {
        // The prologue (push rbp; sub rsp, frame - 16) has not finished: its last
        // instruction is the sub, before which rbp is pushed.
        hotspot_count(HOTSPOT_STEP_COMPILED);
        if (ip + 4 >= begin + complete)
            return hotspot_caller(state, hotspot_word(sp + 8), sp + 16, hotspot_word(sp));
        return hotspot_caller(state, hotspot_word(sp), sp + 8, state->fp);
    }
    if (hotspot_leaf(state) && !bpf_probe_read_user(code, sizeof(code), (void *)(ip - 1))) {
        // In the epilogue (add rsp, frame - 16; pop rbp; [safepoint poll;] ret).
        if (code[1] == 0xc3 || (code[0] == 0x5d && code[1] == 0x49)) {  // at ret, or a poll
            hotspot_count(HOTSPOT_STEP_COMPILED);
            return hotspot_caller(state, hotspot_word(sp), sp + 8, state->fp);
        }
        if (code[1] == 0x5d) {  // at pop rbp
            hotspot_count(HOTSPOT_STEP_COMPILED);
            return hotspot_caller(state, hotspot_word(sp + 8), sp + 16, hotspot_word(sp));
        }
    }
    // A complete frame. C2 code may have pushed a few words more (async-profiler and the
    // OpenTelemetry profiler look as far): the return address is the first word into code.
    u64 words[HOTSPOT_RA_SLOTS + 1] = {};
    u64 top = sp + frame_size;
    if (bpf_probe_read_user(words, sizeof(words), (void *)(top - 16)))
        return 0;
#pragma unroll
    for (int i = 0; i < HOTSPOT_RA_SLOTS; i++) {
        if (hotspot_in_code(jvm, words[i + 1])) {
            hotspot_count(HOTSPOT_STEP_COMPILED);
            return hotspot_caller(state, words[i + 1], top + 8 * i, words[i]);
        }
    }
    hotspot_count(HOTSPOT_STEP_BAD_RETURN);
    return 0;
}

static __always_inline int jit_unwind_step(struct frame_state_t *state, u32 pid)
{
    struct hotspot_jvm_t *jvm = hotspot_jvms.lookup(&pid);
    u64 fp = state->fp;

    if (!jvm)
        return 0;
    if (!hotspot_in_code(jvm, state->ip)) {
        // The Method* word recorded after an interpreted frame: on to its caller, whose sp
        // the interpreter saved (it may have extended the caller's frame for arguments).
        if (state->sp != fp + 8 || hotspot_word(fp - 24) != state->ip)
            return 0;
        u64 frame[2] = {};  // the caller's rbp, the return address
        if (bpf_probe_read_user(frame, sizeof(frame), (void *)fp))
            return 0;
        hotspot_count(HOTSPOT_STEP_METHOD);
        return hotspot_caller(state, frame[1], hotspot_word(fp - 8), frame[0]);
    }
    if (state->ip >= jvm->interpreter_low && state->ip < jvm->interpreter_high) {
        u64 method = hotspot_word(fp - 24);
        // rbp is this frame's: just above sp (the expression stack and monitors between).
        if (fp < state->sp || fp >= state->sp + HOTSPOT_MAX_FRAME || !method || (method & 7))
            return 0;
        hotspot_count(HOTSPOT_STEP_INTERPRETED);
        return hotspot_caller(state, method, fp + 8, fp);
    }
    return hotspot_compiled(state, jvm);
}
