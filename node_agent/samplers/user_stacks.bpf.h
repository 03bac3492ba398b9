// User stacks, walked here rather than by bpf_get_stackid, whose frame-pointer walk stops
// at the first function built without frame pointers (gcc -O2's default, glibc's, most of
// a node's code).
//
// Where the process's file has unwind rows (unwind_tables.bpf.h, prepared in user space from
// .eh_frame / .debug_frame by node_agent/unwind), each frame is unwound by its row: the
// canonical frame address from rsp or rbp, the return address below it, the caller's rbp
// where the row says it was saved. Code without rows (JIT code, a process whose tables are
// not loaded yet) is unwound by frame pointer, and the two join in either direction.
//
// A frameless leaf without rows (JIT stubs) is handled as before: the words above sp are
// scanned for return addresses whose call instruction targets the function below them,
// until one is in a function with a frame pointer (in rbp, or saved on the stack by a
// frameless callee); from there frames are followed. Every step is checked against the code,
// so a stale value on the stack is not taken for a caller; a chain that cannot be joined to
// a frame pointer is dropped and the plain frame-pointer walk is kept.
//
// The walk runs in bpf_loop (walk_user_frame below: one frame per call), so its depth costs
// the verifier nothing: it sees one step, not DEEP_FRAMES of them. Its state lives in the
// per-CPU scratch map. bpf_sampler.py's loader makes BCC's programs able to call it.
//
// Stacks are stored once per generation in user_stacks_<g>, keyed by a 64-bit hash, in
// values of USER_FRAMES frames: a deeper stack takes one more value per USER_FRAMES frames
// (chunk k under chunk_key(hash, k)), so the map's memory stays bounded by MAX_STACKS values
// whatever the depth, and a shallow stack costs what it did. Deeper than DEEP_FRAMES, the
// frames nearest the leaf are kept and the depth says USER_TRUNCATED: user space puts a
// "[truncated]" root above them.
#include <linux/ptrace.h>

#define USER_FRAMES 128      // frames per stored value (bpf_get_stackid's stack: 127); a power of two
#define DEEP_FRAMES 1024     // deepest stack kept: a power of two, a multiple of USER_FRAMES
#define USER_CHUNKS (DEEP_FRAMES / USER_FRAMES)
#define USER_TRUNCATED (1ULL << 63)  // user_stack_t.depth: deeper frames were left out
#define SCAN_WORDS 48        // how far above sp to look for callers of frameless functions
#define LEAF_CALLERS 4       // at most this many frameless functions in a row
#define STACK_REACH 65536    // a frame pointer saved on the stack points at most this far up
#define SAVED_FRAMES 4       // the last this many of those seen are tried (a power of two)
// A leaf whose callers scans did not find this many times in a row (a binary without
// frame pointers) is scanned again only once in RESCAN_EVERY walks: scans are what walks
// cost most.
#define SCAN_PATIENCE 4
#define RESCAN_EVERY 64
// How far from a call's target the code it reaches may be: inside the function, or in
// another one it tail-jumps to (glibc: sem_wait -> ... -> the futex wait), which is nearby.
#define CALL_REACH 65536
#define USER_TOP 0x00007ffffffff000ULL
// An array index the verifier sees bounded to [0, n) (n a power of two): the empty asm keeps
// clang from folding the mask into pointer arithmetic it has proven safe by other means.
#define BOUNDED(index, n)                      \
    ({                                         \
        u64 index_ = (index);                  \
        asm volatile("" : "+r"(index_));       \
        index_ & ((n) - 1);                    \
    })

// sample_key_t.user_stack values that are not hashes.
#define USER_STACK_NONE 0    // no user stack (a kernel thread): nothing lost
#define USER_STACK_LOST 1    // the stack map was full

// One stored value: a whole stack of up to USER_FRAMES frames, or the first chunk of a deeper
// one (depth is the whole stack's, | USER_TRUNCATED), or a later chunk (depth is unused: it
// overlays the previous chunk's last frame).
struct user_stack_t {
    u64 depth;
    u64 ips[USER_FRAMES];  // leaf first
};

// The key of chunk k (k >= 1) of the stack stored under `hash` (stack_maps.py has the same).
#define CHUNK_KEY(hash, k) (HASH_STEP(hash, k) | 2)

// A frame as the walk steps it: where it runs, and its rsp and rbp.
struct frame_state_t {
    u64 ip;
    u64 sp;
    u64 fp;
};

// Scratch space of one walk. The search state is kept here rather than in registers: map
// memory is not tracked value by value by the verifier, so the paths through the scan
// converge instead of multiplying.
struct unwind_t {
    u64 words[SCAN_WORDS];
    u64 callee;  // the last frame found
    u64 found;   // callers found
    u64 frame;   // the frame pointer they joined; 0 while searching
    u64 saved[SAVED_FRAMES];  // the last values seen that may be saved frame pointers
    u64 seen;                 // how many of those were seen
    // The frame being unwound: its instruction address, and the caller-visible rsp and rbp
    // (as a frame_state_t too, for runtime unwinders' steps).
    union {
        struct {
            u64 ip;
            u64 sp;
            u64 fp;
        };
        struct frame_state_t state;
    };
    u64 lo;  // binary search bounds over unwind rows, for the file address pc
    u64 hi;
    u64 pc;
    u64 first;  // the file's first row
    s64 step;  // what the last step did (row_step)
    u64 methods;  // a hash of the words row_step put in the stack itself (Method*s)
    u64 rows;  // whether the process has rows loaded
    u64 pid;
    u64 hash;  // of the frames so far
    struct {
        u64 depth;
        u64 ips[DEEP_FRAMES];  // leaf first
    } stack;  // user_stack_t's layout, deeper
};
BPF_PERCPU_ARRAY(unwind_scratch, struct unwind_t, 1);

struct leaf_t {
    u32 pid;
    u32 pad;
    u64 ip;
};
// Scans from this leaf that failed in a row, then walks since.
BPF_TABLE("lru_hash", struct leaf_t, u32, unjoined_leaves, 4096);
BPF_F_TABLE("hash", u64, struct user_stack_t, user_stacks_0, MAX_STACKS, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", u64, struct user_stack_t, user_stacks_1, MAX_STACKS, BPF_F_NO_PREALLOC);

static __always_inline u64 read_user_word(u64 address)
{
    u64 value = 0;
    bpf_probe_read_user(&value, sizeof(value), (void *)address);
    return value;
}

// Where the PLT entry at `target` jumps (through its GOT slot); `target` if it is none.
static __always_inline u64 through_plt(u64 target)
{
    u8 code[12] = {};
    s32 disp;

    if (bpf_probe_read_user(code, sizeof(code), (void *)target))
        return target;
    if (code[0] == 0xff && code[1] == 0x25) {  // jmp *disp32(%rip)
        __builtin_memcpy(&disp, &code[2], sizeof(disp));
        return read_user_word(target + 6 + disp);
    }
    // endbr64; bnd jmp *disp32(%rip) (.plt.sec of -fcf-protection builds)
    if (code[0] == 0xf3 && code[4] == 0xf2 && code[5] == 0xff && code[6] == 0x25) {
        __builtin_memcpy(&disp, &code[7], sizeof(disp));
        return read_user_word(target + 11 + disp);
    }
    return target;
}

// Whether `ret` is a return address whose call instruction targets code near `callee` (an
// instruction address): the function holding it, or one tail-jumping to it.
static __always_inline bool calls_into(u64 ret, u64 callee)
{
    u8 code[8];
    s32 disp;
    u64 target;

    if (ret < 4096 || ret >= USER_TOP)
        return false;
    if (bpf_probe_read_user(code, sizeof(code), (void *)(ret - sizeof(code))))
        return false;
    __builtin_memcpy(&disp, &code[4], sizeof(disp));
    if (code[3] == 0xe8)  // call rel32
        target = through_plt(ret + disp);
    else if (code[2] == 0xff && code[3] == 0x15)  // call *disp32(%rip)
        target = read_user_word(ret + disp);
    else
        return false;
    return callee + CALL_REACH >= target && callee < target + CALL_REACH;
}

// The frame pointer of the function holding `ret`, the return address scanned at `slot`:
// rbp if its frameless callees kept it, else a value one of them saved on the stack; 0 if
// there is none.
static __always_inline u64 frame_of(struct unwind_t *unwind, u64 fp, u64 slot, u64 ret)
{
    if (calls_into(read_user_word(fp + 8), ret))
        return fp;
#pragma unroll
    for (int i = 0; i < SAVED_FRAMES; i++) {
        u64 saved = unwind->saved[i];
        if (saved > slot && calls_into(read_user_word(saved + 8), ret))
            return saved;
    }
    return 0;
}

// Find the callers of a frameless leaf above sp, into stack.ips[1..found]; returns the
// frame pointer of the first caller that has one, or 0 if the chain joins none.
static __always_inline u64 leaf_callers(struct unwind_t *unwind, u64 sp, u64 fp)
{
    if (bpf_probe_read_user(unwind->words, sizeof(unwind->words), (void *)sp))
        return 0;
    unwind->callee = unwind->stack.ips[0];
    unwind->found = 0;
    unwind->frame = 0;
    unwind->seen = 0;
    __builtin_memset(unwind->saved, 0, sizeof(unwind->saved));
    for (u32 i = 0; i < SCAN_WORDS; i++) {
        u64 word = unwind->words[i], found = unwind->found + 1, here = sp + 8 * i;
        if (unwind->frame || found > LEAF_CALLERS)
            break;
        if (word > here && word < here + STACK_REACH) {
            // An address up the stack: kept if it may be a frame pointer, which is 16-byte
            // aligned and has a return address (not another stack address) above it.
            u64 above = read_user_word(word + 8);
            if (!(word & 15) && above >= 4096 && above < USER_TOP &&
                !(above > here && above < here + STACK_REACH))
                unwind->saved[unwind->seen++ & (SAVED_FRAMES - 1)] = word;
            continue;
        }
        if (!calls_into(word, unwind->callee))
            continue;
        unwind->stack.ips[BOUNDED(found, 8)] = word;  // found <= LEAF_CALLERS < 8
        unwind->found = found;
        unwind->callee = word;
        unwind->frame = frame_of(unwind, fp, here, word);
    }
    return unwind->frame;
}

// FNV-1a over the frames, a word at a time.
#define HASH_START 0xcbf29ce484222325ULL
#define HASH_STEP(hash, ip) (((hash) ^ (ip)) * 0x100000001b3ULL)

// Steps of the binary search over a file's rows: enough for 2^ROW_SEARCH_STEPS rows.
#define ROW_SEARCH_STEPS 23

#if NATIVE_UNWIND
static __always_inline void count_unwind(u32 stat)
{
    u64 *value = unwind_stats_UNWIND_ID.lookup(&stat);
    if (value)
        (*value)++;
}

// Step the frame in unwind->{ip, sp, fp} to its caller by the row of its file, leaving in
// unwind->step 1 if done, 0 if there is no row (the caller then uses frame pointers), -1 at
// the outermost frame. `call` is 1 for return addresses (the call is the byte before) and 0
// for the leaf. Results go through map memory, whose values the verifier does not track one
// by one: the walk's paths then converge instead of multiplying frame after frame.
static __always_inline void row_step(struct unwind_t *unwind, u32 pid, u64 call)
{
    u64 pc = unwind->ip - call, cfa;
    struct unwind_key_t key = {
        .prefixlen = 96, .pid = __builtin_bswap32(pid), .address = __builtin_bswap64(pc)};
    struct unwind_range_t *range = unwind_ranges_UNWIND_ID.lookup(&key);
    struct unwind_row_t *row;
    u32 index;

    unwind->step = 0;
    if (!range)
        return;
    // The last row at or below pc: lo ends at the first row above it.
    unwind->first = unwind->lo = range->rows_start;
    unwind->hi = (u64)range->rows_start + range->rows_count;
    unwind->pc = pc - range->bias;
    for (int i = 0; i < ROW_SEARCH_STEPS; i++) {
        u32 middle = (unwind->lo + unwind->hi) / 2;
        struct unwind_row_t *probe = unwind_rows_UNWIND_ID.lookup(&middle);
        if (unwind->lo >= unwind->hi)
            break;
        if (probe && probe->pc <= unwind->pc)
            unwind->lo = middle + 1;
        else
            unwind->hi = middle;
    }
    index = unwind->lo - 1;
    row = unwind_rows_UNWIND_ID.lookup(&index);
    if (unwind->lo <= unwind->first)
        row = 0;
    if (!row || row->cfa_kind == CFA_UNKNOWN) {
        count_unwind(STAT_NO_ROW);
        return;
    }
    if (row->cfa_kind == CFA_INTERPRETER) {
        // frame_x86.hpp: the Method* at rbp - 3 words, the caller's sp at rbp - 1 (the
        // interpreter may have extended the caller's frame), the caller's rbp at rbp, the
        // return address above. The Method* goes in the stack as a word of its own after the
        // interpreter's pc: user space names the frame from it. (Read into map memory, and
        // without branches, for the verifier: this runs in every step of the walk.)
        u64 depth = unwind->stack.depth;
        if (bpf_probe_read_user(unwind->words, 5 * sizeof(u64), (void *)(unwind->fp - 24))) {
            count_unwind(STAT_BAD_READ);
            return;
        }
        // A full stack (depth DEEP_FRAMES) has its last word replaced: the walk stops there.
        u64 full = depth / DEEP_FRAMES;
        unwind->stack.ips[BOUNDED(depth - full, DEEP_FRAMES)] = unwind->words[0];
        unwind->stack.depth = depth + 1 - full;
        unwind->methods = HASH_STEP(unwind->methods, unwind->words[0]);
        unwind->ip = unwind->words[4];
        unwind->sp = unwind->words[2];
        unwind->fp = unwind->words[3];
        unwind->step = 1;
        return;
    }
    unwind->step = -1;
    if (row->cfa_kind == CFA_END)
        return;
    if (row->cfa_kind == CFA_RSP)
        cfa = unwind->sp + row->cfa_offset;
    else if (row->cfa_kind == CFA_RBP)
        cfa = unwind->fp + row->cfa_offset;
    else  // CFA_PLT
        cfa = unwind->sp + 8 + ((unwind->ip & 15) >= row->cfa_offset ? 8 : 0);
    if (row->rbp_slot &&
        bpf_probe_read_user(&unwind->fp, sizeof(u64), (void *)(cfa + 8 * (s64)(s8)row->rbp_slot)))
        count_unwind(STAT_BAD_READ);
    if (bpf_probe_read_user(&unwind->ip, sizeof(u64), (void *)(cfa - 8))) {
        count_unwind(STAT_BAD_READ);
        return;
    }
    unwind->sp = cfa;
    unwind->step = 1;
    count_unwind(STAT_TABLE_FRAMES);
}
#endif

// Step the frame in unwind->{ip, sp, fp} to its caller by its frame pointer; 0 if there is
// none to follow.
static __always_inline int pointer_step(struct unwind_t *unwind)
{
    u64 frame[2] = {};  // the caller's frame pointer, the return address
    u64 fp = unwind->fp;

    if (bpf_probe_read_user(frame, sizeof(frame), (void *)fp))
        return 0;
    // Frames only go up the stack.
    if (frame[0] && frame[0] <= fp)
        frame[0] = 0;
    unwind->ip = frame[1];
    unwind->sp = fp + 16;
    unwind->fp = frame[0];
#if NATIVE_UNWIND
    count_unwind(STAT_POINTER_FRAMES);
#endif
    return 1;
}

// One step of the walk, as bpf_loop's callback: the frame in unwind->{ip, sp, fp} (stepped
// to by the previous call, or found at the start) is recorded, then stepped to its caller.
// Returns 1 when the stack ends. Not static: BCC compiles it as a function of its own, which
// bpf_loop.py appends to each program that calls it (BCC cannot link callbacks itself).
long walk_user_frame(u64 index)
{
    u32 zero = 0;
    struct unwind_t *unwind = unwind_scratch.lookup(&zero);
    u64 depth;

    if (!unwind || unwind->step < 0)
        return 1;
    if (unwind->step == 0 && !pointer_step(unwind))
        return 1;
    if (unwind->ip < 4096 || unwind->ip >= USER_TOP)
        return 1;
    depth = unwind->stack.depth;
    if (depth >= DEEP_FRAMES) {
        // The frames nearest the leaf are kept; the hash tells the stack from one that ends
        // there.
        unwind->stack.depth = DEEP_FRAMES | USER_TRUNCATED;
        unwind->hash = HASH_STEP(unwind->hash, USER_TRUNCATED);
#if NATIVE_UNWIND
        count_unwind(STAT_TRUNCATED);
#endif
        return 1;
    }
    unwind->stack.ips[BOUNDED(depth, DEEP_FRAMES)] = unwind->ip;
    unwind->stack.depth = depth + 1;
    unwind->hash = HASH_STEP(unwind->hash, unwind->ip);
    unwind->step = 0;
#if NATIVE_UNWIND
    if (unwind->rows)
        row_step(unwind, unwind->pid, 1);
#endif
    // Neither a row nor a frame pointer to follow: the stack ends here.
    return unwind->step == 0 && !unwind->fp;
}

// Store the walked stack under `hash` in user_stacks_<at & 1>: the chunks after the first
// (if any), then the first, which names the depth. A chunk the map has no room for cuts
// the stack there (USER_TRUNCATED). Returns whether the stack is stored.
static __always_inline bool store_user_stack(struct unwind_t *unwind, u32 at, u64 hash)
{
    u64 depth = unwind->stack.depth;
    u32 frames = depth & ~USER_TRUNCATED;

    // BCC resolves map names at compile time, so each generation is spelled out.
    if (at & 1 ? user_stacks_1.lookup(&hash) != 0 : user_stacks_0.lookup(&hash) != 0)
        return true;
#pragma unroll
    for (u32 k = 1; k < USER_CHUNKS; k++) {
        u64 key = CHUNK_KEY(hash, k);
        // Chunk k's frames, after the word before them (unused).
        struct user_stack_t *chunk = (void *)&unwind->stack.ips[k * USER_FRAMES - 1];
        if (frames <= k * USER_FRAMES)
            break;
        if (at & 1 ? user_stacks_1.update(&key, chunk) : user_stacks_0.update(&key, chunk)) {
            depth = k * USER_FRAMES | USER_TRUNCATED;
#if NATIVE_UNWIND
            count_unwind(STAT_TRUNCATED);
#endif
            break;
        }
    }
    unwind->stack.depth = depth;
    if (at & 1) {
        user_stacks_1.insert(&hash, (struct user_stack_t *)&unwind->stack);
        return user_stacks_1.lookup(&hash) != 0;
    }
    user_stacks_0.insert(&hash, (struct user_stack_t *)&unwind->stack);
    return user_stacks_0.lookup(&hash) != 0;
}

// Walk the current thread's user stack into user_stacks_<at & 1>; returns its hash, or
// USER_STACK_NONE / USER_STACK_LOST.
static __always_inline u64 record_user_stack(u32 at)
{
    u32 zero = 0, pid = bpf_get_current_pid_tgid() >> 32;
    u64 hash = HASH_START;
    struct unwind_t *unwind = unwind_scratch.lookup(&zero);
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());

    if (!unwind)
        return USER_STACK_LOST;
    bpf_probe_read_kernel(&unwind->ip, sizeof(u64), &regs->ip);
    bpf_probe_read_kernel(&unwind->sp, sizeof(u64), &regs->sp);
    bpf_probe_read_kernel(&unwind->fp, sizeof(u64), &regs->bp);
    if (!unwind->ip || unwind->ip >= USER_TOP)
        return USER_STACK_NONE;
    unwind->stack.ips[0] = unwind->ip;
    unwind->stack.depth = 1;
    unwind->step = 0;
    unwind->rows = 0;
    unwind->methods = 0;
    unwind->pid = pid;
#if NATIVE_UNWIND
    u64 *sampled = unwind_pids_UNWIND_ID.lookup(&pid);
    if (sampled) {
        *sampled = bpf_ktime_get_ns();
        unwind->rows = 1;
        row_step(unwind, pid, 0);
    } else {
        u8 one = 1;
        unwind_pending_UNWIND_ID.insert(&pid, &one);
        count_unwind(STAT_UNKNOWN_PID);
    }
#endif
    if (unwind->step == 0 && !calls_into(read_user_word(unwind->fp + 8), unwind->ip)) {
        // A frameless leaf without rows: its callers are scanned for.
        struct leaf_t leaf = {.pid = pid, .ip = unwind->ip};
        u32 *misses = unjoined_leaves.lookup(&leaf), one = 1;
        if (!misses || *misses < SCAN_PATIENCE || ++*misses % RESCAN_EVERY == 0) {
            u64 joined = leaf_callers(unwind, unwind->sp, unwind->fp);
            if (joined) {
                // The last caller found is the frame to step from, by its frame pointer.
                unwind->stack.depth = 1 + unwind->found;
                unwind->ip = unwind->stack.ips[BOUNDED(unwind->found, 8)];
                unwind->fp = joined;
                if (misses)
                    unjoined_leaves.delete(&leaf);
            } else if (!misses) {
                unjoined_leaves.update(&leaf, &one);
            } else if (*misses < SCAN_PATIENCE) {
                (*misses)++;
            }
        }
        // Without callers found: the plain frame-pointer walk from rbp.
    }
    // Hashed here, not in the walk: the walk's many exits would each be verified with it.
#pragma unroll
    for (int i = 0; i <= LEAF_CALLERS; i++) {
        if (i < unwind->stack.depth)
            hash = HASH_STEP(hash, unwind->stack.ips[i]);
    }
    unwind->hash = hash;
    bpf_loop(DEEP_FRAMES, (void *)walk_user_frame, 0, 0);
    hash = unwind->hash ^ unwind->methods;
    hash |= 2;  // never USER_STACK_NONE or USER_STACK_LOST
    return store_user_stack(unwind, at, hash) ? hash : USER_STACK_LOST;
}
