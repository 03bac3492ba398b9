// Block requests: block_rq_issue to block_rq_complete (device time, as biolatency measures
// it), kept as log2 latency histograms per (submitting process, device, op) and as weight
// on the stacks of the thread that queued the request. Requests are matched by (device,
// sector): these tracepoints carry no request pointer.

// sample_key_t.detail: op << 32 | device (major << 20 | minor).

// Block ops, in the order of fleetprof.proto.schema.IO_OPS.
#define OP_READ 0
#define OP_WRITE 1
#define OP_FLUSH 2
#define OP_DISCARD 3
#define OP_OTHER 4

#define MAX_REQUESTS 16384
#define MAX_LATENCY_KEYS 16384

struct request_key_t {
    u32 dev;
    u32 pad;
    u64 sector;
};

struct request_t {
    u64 issued;  // ns at block_rq_issue; 0 before
    u32 epoch;   // when the submitter's stacks were recorded
    u32 op;
    struct sample_key_t submitter;
};
// LRU: the entry of a bio merged into another request is never completed on its own.
BPF_TABLE("lru_hash", struct request_key_t, struct request_t, requests, MAX_REQUESTS);

struct latency_key_t {
    u32 pid;
    u32 dev;
    u32 op;
    u32 slot;  // latency <= 2^slot ns
    char comm[TASK_COMM_LEN];
};
BPF_HASH(latency_0, struct latency_key_t, u64, MAX_LATENCY_KEYS);
BPF_HASH(latency_1, struct latency_key_t, u64, MAX_LATENCY_KEYS);
// Requests that found the latency map full.
BPF_PERCPU_ARRAY(dropped_requests, u64, 1);

// rwbs: an optional F (pre-flush), then the op: R, W, D (discard), F (flush), N (none).
static __always_inline u32 block_op(const char *rwbs)
{
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (rwbs[i] == 'R')
            return OP_READ;
        if (rwbs[i] == 'W')
            return OP_WRITE;
        if (rwbs[i] == 'D')
            return OP_DISCARD;
    }
    return rwbs[0] == 'F' ? OP_FLUSH : OP_OTHER;
}

// The current thread queues (or, if nobody did, issues) the request at dev:sector.
static __always_inline void remember_submitter(void *ctx, u32 dev, u64 sector)
{
    struct request_key_t key = {.dev = dev, .sector = sector};
    struct request_t request = {.epoch = current_epoch()};

    current_key(&request.submitter, 0);
    // The user stack says who; walking the kernel one costs microseconds per request, so
    // only kernel threads (writeback, journal) have theirs.
    record_stacks(ctx, &request.submitter, request.epoch, KERNEL_THREADS_ONLY);
    requests.update(&key, &request);
}

TRACEPOINT_PROBE(block, block_bio_queue)
{
    remember_submitter(args, args->dev, args->sector);
    return 0;
}

// Requests that came from no bio (passthrough) are first seen here or at issue.
TRACEPOINT_PROBE(block, block_rq_insert)
{
    struct request_key_t key = {.dev = args->dev, .sector = args->sector};
    if (!requests.lookup(&key))
        remember_submitter(args, args->dev, args->sector);
    return 0;
}

TRACEPOINT_PROBE(block, block_rq_issue)
{
    struct request_key_t key = {.dev = args->dev, .sector = args->sector};
    struct request_t *request = requests.lookup(&key);
    if (!request) {
        remember_submitter(args, args->dev, args->sector);
        request = requests.lookup(&key);
        if (!request)
            return 0;
    }
    request->issued = bpf_ktime_get_ns();
    request->op = block_op(args->rwbs);
    return 0;
}

static __always_inline void count_latency(struct request_t *request, u32 dev, u64 ns)
{
    struct latency_key_t key = {
        .pid = request->submitter.pid,
        .dev = dev,
        .op = request->op,
        .slot = ns > 1 ? bpf_log2l(ns - 1) : 0,
    };
    u64 zero = 0, *count;
    u32 index = 0;

    __builtin_memcpy(key.comm, request->submitter.comm, sizeof(key.comm));
    if (current_epoch() & 1)
        count = latency_1.lookup_or_try_init(&key, &zero);
    else
        count = latency_0.lookup_or_try_init(&key, &zero);
    if (count)
        __sync_fetch_and_add(count, 1);
    else
        dropped_requests.increment(index);
}

TRACEPOINT_PROBE(block, block_rq_complete)
{
    struct request_key_t key = {.dev = args->dev, .sector = args->sector};
    struct request_t *request = requests.lookup(&key);
    if (!request)
        return 0;
    // Requests issued from interrupts on an idle CPU (pid 0) count too, but in a session.
    u32 pid = request->submitter.pid;
    if (request->issued && (pid ? !ignored(pid) : !SESSION_FILTER)) {
        u64 ns = bpf_ktime_get_ns() - request->issued;
        count_latency(request, args->dev, ns);
        struct sample_key_t submitter = request->submitter;
        submitter.detail = (u64)request->op << 32 | args->dev;
        add_weight(&submitter, request->epoch, ns);
    }
    requests.delete(&key);
    return 0;
}
