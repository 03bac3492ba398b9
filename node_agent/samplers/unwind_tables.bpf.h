// The native unwinder's tables (node_agent/unwind/native.py fills them), declared once for
// the module that owns them (UNWIND_OWNER) and as BCC "extern" tables for every sampler, so
// the four samplers and on-demand sessions share one copy of every file's rows.
// UNWIND_ID is replaced by the owning unwinder's id before compiling: public tables are
// named process-wide, and two agents may run in one process.

// cfa_kind (node_agent/unwind/cfi.py has the same).
#define CFA_UNKNOWN 0  // no rule: frame pointers
#define CFA_RSP 1
#define CFA_RBP 2
#define CFA_PLT 3      // rsp + 8, + 8 more from instruction offset cfa_offset of the entry
#define CFA_END 4      // the outermost frame
// HotSpot's template interpreter (unwind/hotspot.py): rbp frames holding the Method*, which
// is recorded as a frame of its own, and the caller's sp.
#define CFA_INTERPRETER 5

// One unwind row: from file address pc on (to the next row), how to find the caller.
struct unwind_row_t {
    u32 pc;
    u16 cfa_offset;
    u8 cfa_kind;
    u8 rbp_slot;  // signed (BCC has no ctype for s8): the caller's rbp is at CFA + 8 * rbp_slot; 0: rbp is kept
};

// A process's executable file mappings, by longest prefix of (pid, address), both big-endian.
struct unwind_key_t {
    u32 prefixlen;
    u32 pid;
    u64 address;
};

struct unwind_range_t {
    u64 bias;        // file address = address - bias
    u32 rows_start;  // the file's rows in unwind_rows_UNWIND_ID
    u32 rows_count;  // 0: the file has no usable CFI (frame pointers)
};

// unwind_stats_UNWIND_ID indices (native.py reads them by these positions).
#define STAT_TABLE_FRAMES 0   // frames unwound with a row
#define STAT_POINTER_FRAMES 1 // frames unwound by frame pointer (JIT, no CFI)
#define STAT_UNKNOWN_PID 2    // stacks of processes without tables yet (frame pointers)
#define STAT_NO_ROW 3         // frames whose file had no row for their address
#define STAT_TRUNCATED 4      // stacks deeper than USER_FRAMES
#define STAT_BAD_READ 5       // a return address or saved rbp that could not be read
#define UNWIND_STATS 6

#if NATIVE_UNWIND
#if UNWIND_OWNER
#define UNWIND_TABLE(type, key, leaf, name, entries, flags)             \
    BPF_F_TABLE(type, key, leaf, name, entries, flags);                 \
    __attribute__((section("maps/export"))) struct name##_table_t __##name
#else
#define UNWIND_TABLE(type, key, leaf, name, entries, flags) \
    BPF_F_TABLE("extern", key, leaf, name, entries, flags)
#endif

// Mapped into the agent (BPF_F_MMAPABLE): a file's rows are copied in, not written one by one.
UNWIND_TABLE("array", u32, struct unwind_row_t, unwind_rows_UNWIND_ID, MAX_UNWIND_ROWS,
             BPF_F_MMAPABLE);
UNWIND_TABLE("lpm_trie", struct unwind_key_t, struct unwind_range_t, unwind_ranges_UNWIND_ID,
             MAX_UNWIND_RANGES, BPF_F_NO_PREALLOC);
// Processes whose ranges are loaded, with when they were last sampled (bpf_ktime_get_ns):
// when rows run out, those idle longest make room.
UNWIND_TABLE("hash", u32, u64, unwind_pids_UNWIND_ID, MAX_UNWIND_PIDS, 0);
// Processes sampled before their ranges were loaded: user space loads them, then deletes.
UNWIND_TABLE("hash", u32, u8, unwind_pending_UNWIND_ID, 4096, 0);
UNWIND_TABLE("percpu_array", u32, u64, unwind_stats_UNWIND_ID, UNWIND_STATS, 0);
#endif
