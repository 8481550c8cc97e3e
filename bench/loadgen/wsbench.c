/*
 * wsbench - a small, fast WebSocket load generator for broadcast servers.
 *
 * Single-threaded epoll event loop, C11 + libc only.  Opens N subscriber and
 * P publisher connections; each publisher keeps W of its own messages in
 * flight (a new one is sent every time one of its own comes back).  Every
 * text frame that carries a wsbench header is a delivery; its latency is
 * now - (send time in the header), both CLOCK_MONOTONIC.
 *
 * --soak: the same load, plus churn (subscribers closed cleanly and replaced),
 * per-connection ordering checks, and a drain: each connection records the
 * server's shutdown frame, publishers stop on theirs, and every connection
 * closes --linger-ms after its own; the run ends when the last one is closed.
 *
 * --expect-close --follow-upgrade: on a shutdown frame whose reason is
 * "upgrade", each connection opens a new one after the frame's
 * reconnect_after_ms and closes the old one once the new one is open (make
 * before break), as ebbcast's own clients do; the moves are timed and counted.
 * In --idle and --expect-close modes, the server's periodic frames ("ts" in
 * seconds) are timed too: their delivery latency, and one connection's stamps.
 *
 * See README.md beside this file for options and output.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define READ_SZ (64 * 1024)        /* bytes asked of one read() */
#define SMALL_MAX (64 * 1024)      /* partial frames up to this go via the shared buffer */
#define MAX_FRAME (256u << 20)     /* refuse server frames above this */
#define MAX_EVENTS 1024
#define HS_MAX 16384               /* handshake response header limit */
#define MIN_SIZE 48                /* room for the header */
#define HOUSEKEEP_NS 100000000LL   /* 100 ms */

/* RFC 6455 sample key and its accept value: no SHA-1 needed to verify. */
#define WS_KEY "dGhlIHNhbXBsZSBub25jZQ=="
#define WS_ACCEPT "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

static const uint8_t MASK[4] = {0x5a, 0x3c, 0xa7, 0x19};

enum { ST_NEW, ST_CONNECTING, ST_HANDSHAKE, ST_OPEN, ST_CLOSED };
enum { PH_RAMP, PH_WARMUP, PH_MEASURE, PH_HOLD, PH_CLOSING, PH_EXIT, PH_SOAK, PH_SETTLE, PH_AWAIT, PH_DRAIN };
enum { MODE_PUBLISH, MODE_IDLE, MODE_EXPECT_CLOSE, MODE_SOAK };

typedef struct conn {
    int fd;
    uint8_t state;
    uint8_t is_pub;
    uint8_t want_out;   /* EPOLLOUT registered */
    uint8_t frag;       /* 0: none, 1: text message in progress, 2: binary */
    uint8_t close_sent;
    uint8_t frag_valid;
    /* soak mode */
    uint8_t initiated;  /* this side sent the first close frame */
    uint8_t churned;    /* closed by churn */
    uint8_t mid;        /* opened mid-stream (churn replacement) */
    uint8_t expect_sd;  /* open when the drain began: owed a shutdown frame */
    uint8_t pub_stopped;/* publisher got its shutdown frame: no more sends */
    uint8_t got_frame;  /* a data frame has arrived (the first must be the welcome) */
    uint16_t close_code;
    uint32_t pubid;
    uint32_t inflight;
    uint64_t seq;
    uint64_t frag_ts;
    uint64_t frag_seq;
    uint64_t last_periodic; /* soak: last periodic "seq" seen */
    uint32_t frag_pub;
    uint32_t rlen, rcap;
    uint32_t wlen, woff, wcap;
    uint64_t need;      /* total bytes of the incomplete frame, 0 if unknown */
    uint8_t *rbuf;
    uint8_t *wbuf;
    int64_t t_start;    /* connect start */
    int64_t t_open;     /* handshake complete (101 read) */
    int64_t last_echo;
    int64_t t_shutdown; /* expect-close: shutdown frame seen */
    int64_t t_close;    /* expect-close: close frame or EOF seen; soak: socket closed */
    int64_t t_close_sent; /* soak: this side's close frame sent */
    int64_t t_move_due; /* follow-upgrade: when to open the replacement (0: none) */
    long move_from;     /* follow-upgrade: 1 + the slot this one replaces (0: none) */
} conn;

/* ---- options ---- */
static const char *o_host = "127.0.0.1";
static int o_port = 8000;
static const char *o_path = "/ws";
static const char *o_origin = NULL;
static int o_pubs_set = 0;
static long o_subs = 1000, o_pubs = 1, o_window = 1, o_size = 100;
static double o_duration = 10, o_warmup = 1, o_rate = 0, o_conn_timeout = 10;
static double o_poll_us = 0;
static double o_stall = 5, o_close_timeout = 2;
static long o_max_pending = 200;
static int o_mode = MODE_PUBLISH, o_json = 0, o_quiet = 0;
static const char *o_server_pids = NULL;
static double o_churn_every_ms = 250, o_linger_ms = 500, o_shutdown_wait = 10;
static long o_churn = 10;
static uint64_t o_seed = 0;
static int o_follow_upgrade = 0;
static long o_channels = 0;   /* ebbcast channels: subscribe, publish to channels */
static struct sockaddr_in g_sources[64];
static int g_nsources = 0, g_next_source = 0;
/* follow-upgrade: moves started, completed and failed (each failure is retried) */
static uint64_t c_moves_started, c_moves_done, e_move_failed, e_move_nofd;
static int64_t next_move_scan;
/* periodic frames: delivery latency (us) of every one, and the stamps seen by slot 0 */
static uint32_t *g_periodic_us;
static size_t g_periodic_n, g_periodic_cap;
static double g_stamps[8192];
static size_t g_nstamps;
static int o_seed_set = 0;

/* ---- state ---- */
static conn *conns;
static long total;
static int ep;
static int phase = PH_RAMP;
static volatile sig_atomic_t g_signals = 0;
static struct sockaddr_storage g_addr;
static socklen_t g_addrlen;
static char g_req[2048];
static size_t g_reqlen;
static uint8_t *g_shared;
static uint8_t *g_tmpl;       /* masked publish frame template */
static size_t g_tmpl_len, g_tmpl_hdr;
static int g_publishing = 0;
static int g_measuring = 0;

static long next_launch = 0, pending = 0, n_open = 0, n_done = 0, n_connected = 0;
static int64_t ramp_start, ramp_end, warm_end, meas_start, meas_end, hold_end, close_deadline;
static int64_t ready_mono, ready_real;
static int64_t last_housekeep;

/* soak state */
static long n_initial;          /* o_subs + o_pubs: the ramp's connections */
static long cap_slots;          /* allocated conns[] slots; total = slots in use */
static uint64_t *g_last_seq;    /* [slot * o_pubs + publisher]: last seq seen, 0 = none */
static uint64_t g_rng;
static int64_t soak_start, soak_end, next_churn, steady_mono, await_deadline, next_scan;
static int64_t first_shutdown, close_all_at;
static int g_sig_closing = 0;
static uint64_t c_churned, c_churn_opened, c_ooo, c_gaps, c_periodic, c_periodic_ooo;
static uint64_t c_welcome_not_first, c_dup_shutdown, c_after_shutdown, c_periodic_after_shutdown, e_close_timeout;

/* counters (monotonic over the run; snapshot at measure start/end) */
static uint64_t c_pings, c_fragmented;
static uint64_t c_sent, c_delivered, c_other, c_echoes, c_stalls;
static uint64_t s_sent, s_delivered, s_other;
static uint64_t e_connect, e_handshake, e_timeout, e_unexpected, e_io, e_protocol;
static uint64_t c_epoll_waits, c_events, c_reads, s_epoll_waits, s_events, s_reads;
static uint64_t c_shutdown_frames, c_close_frames, c_eofs;
static struct rusage ru_start, ru_end;
static double srv_cpu_start = -1, srv_cpu_end = -1;
static double srv_cpu_ramp_start = -1, srv_cpu_ramp_end = -1; /* over the connect phase */
static long srv_rss_ready = -1, srv_rss_end = -1;
static int g_exit_code = 0;

/* ---- histogram: log-linear, 128 sub-buckets per power of two (<0.4% error) ---- */
#define HBUCKETS (256 + 56 * 128)
static uint64_t hist[HBUCKETS];
static uint64_t h_count, h_max, h_min = UINT64_MAX;
static double h_sum;

static inline unsigned hidx(uint64_t v)
{
    if (v < 256)
        return (unsigned)v;
    unsigned msb = 63u - (unsigned)__builtin_clzll(v);
    unsigned shift = msb - 7u;
    return 256u + (shift - 1u) * 128u + (unsigned)((v >> shift) - 128u);
}

static uint64_t hval(unsigned i)
{
    if (i < 256)
        return i;
    unsigned shift = (i - 256u) / 128u + 1u;
    uint64_t top = (i - 256u) % 128u + 128u;
    return (top << shift) + ((1ull << shift) >> 1);
}

static inline void hrecord(uint64_t v)
{
    hist[hidx(v)]++;
    h_count++;
    h_sum += (double)v;
    if (v > h_max)
        h_max = v;
    if (v < h_min)
        h_min = v;
}

static uint64_t hpct(double q)
{
    if (!h_count)
        return 0;
    uint64_t target = (uint64_t)(q * (double)h_count);
    if ((double)target < q * (double)h_count)
        target++;
    if (target < 1)
        target = 1;
    uint64_t acc = 0;
    for (unsigned i = 0; i < HBUCKETS; i++) {
        acc += hist[i];
        if (acc >= target) {
            uint64_t v = hval(i);
            if (v > h_max)
                v = h_max;
            if (v < h_min)
                v = h_min;
            return v;
        }
    }
    return h_max;
}

/* ---- utilities ---- */
static inline int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int64_t real_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("wsbench: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static void logmsg(const char *fmt, ...)
{
    if (o_quiet)
        return;
    va_list ap;
    va_start(ap, fmt);
    fputs("wsbench: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n);
    if (!q)
        die("out of memory (%zu bytes)", n);
    return q;
}

static inline char *u64toa(char *p, uint64_t v)
{
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    return p;
}

static double ru_secs(const struct rusage *r)
{
    return (double)r->ru_utime.tv_sec + r->ru_utime.tv_usec / 1e6 +
           (double)r->ru_stime.tv_sec + r->ru_stime.tv_usec / 1e6;
}

/* Seconds of CPU (utime+stime) in the text of a /proc/PID/stat, -1 if unparsable. */
static double stat_cpu_seconds(const char *text)
{
    const char *p = strrchr(text, ')');
    unsigned long ut = 0, st = 0;
    /* fields after ')': state(3) ... utime(14) stime(15) */
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2)
        return -1;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/* KiB of VmRSS in the text of a /proc/PID/status, -1 if absent. */
static double status_rss_kib(const char *text)
{
    const char *p = strstr(text, "\nVmRSS:");
    return p ? (double)strtol(p + 7, NULL, 10) : -1;
}

/* The sum of parse(/proc/PID/FILE) over the --server-pid list, -1 if unknown. */
static double sum_over_server_pids(const char *file, double (*parse)(const char *))
{
    if (!o_server_pids)
        return -1;
    double sum = 0;
    char list[512];
    snprintf(list, sizeof list, "%s", o_server_pids);
    for (char *save = NULL, *tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char path[64], buf[4096];
        snprintf(path, sizeof path, "/proc/%s/%s", tok, file);
        FILE *f = fopen(path, "r");
        if (!f)
            return -1;
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = 0;
        double v = parse(buf);
        if (v < 0)
            return -1;
        sum += v;
    }
    return sum;
}

/* Sum of utime+stime (seconds) of the --server-pid processes, -1 if unknown. */
static double server_cpu(void)
{
    return sum_over_server_pids("stat", stat_cpu_seconds);
}

/* Sum of VmRSS (KiB) of the --server-pid processes, -1 if unknown. */
static long server_rss(void)
{
    return (long)sum_over_server_pids("status", status_rss_kib);
}

/* ---- epoll / write side ---- */
static void ep_set(conn *c, uint32_t events, int op)
{
    struct epoll_event ev;
    ev.events = events;
    ev.data.u64 = (uint64_t)(c - conns);
    if (epoll_ctl(ep, op, c->fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
}

static void want_out(conn *c, int on)
{
    if (c->want_out == on)
        return;
    c->want_out = (uint8_t)on;
    ep_set(c, EPOLLIN | (on ? EPOLLOUT : 0), EPOLL_CTL_MOD);
}

static inline void wreserve(conn *c, size_t extra)
{
    size_t need = (size_t)c->wlen + extra;
    if (need <= c->wcap)
        return;
    size_t cap = c->wcap ? c->wcap : 256;
    while (cap < need)
        cap *= 2;
    c->wbuf = xrealloc(c->wbuf, cap);
    c->wcap = (uint32_t)cap;
}

static void conn_close(conn *c);

/* Returns -1 when the connection died (and was closed). */
static int flush_conn(conn *c)
{
    while (c->woff < c->wlen) {
        ssize_t n = write(c->fd, c->wbuf + c->woff, c->wlen - c->woff);
        if (n > 0) {
            c->woff += (uint32_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            want_out(c, 1);
            return 0;
        }
        if (phase != PH_CLOSING)
            e_io++;
        conn_close(c);
        return -1;
    }
    c->woff = c->wlen = 0;
    if (c->want_out)
        want_out(c, 0);
    return 0;
}

/* Queue a small masked control frame (payload <= 125). */
static void queue_ctrl(conn *c, uint8_t opcode, const uint8_t *p, size_t n)
{
    if (n > 125)
        n = 125;
    wreserve(c, 6 + n);
    uint8_t *w = c->wbuf + c->wlen;
    w[0] = (uint8_t)(0x80 | opcode);
    w[1] = (uint8_t)(0x80 | n);
    memcpy(w + 2, MASK, 4);
    for (size_t i = 0; i < n; i++)
        w[6 + i] = p[i] ^ MASK[i & 3];
    c->wlen += (uint32_t)(6 + n);
}

static void send_close(conn *c, uint16_t code)
{
    if (c->close_sent)
        return;
    uint8_t p[2] = {(uint8_t)(code >> 8), (uint8_t)code};
    queue_ctrl(c, 8, p, code ? 2 : 0);
    c->close_sent = 1;
}

/* Build the publish frame template: header, mask key, masked 'x' padding. */
/* A masked text frame's header for n payload bytes, mask included: its length. */
static size_t text_header(uint8_t hdr[14], size_t n)
{
    size_t h;
    hdr[0] = 0x81;
    if (n < 126) {
        hdr[1] = (uint8_t)(0x80 | n);
        h = 2;
    } else if (n < 65536) {
        hdr[1] = 0x80 | 126;
        hdr[2] = (uint8_t)(n >> 8);
        hdr[3] = (uint8_t)n;
        h = 4;
    } else {
        hdr[1] = 0x80 | 127;
        for (int i = 0; i < 8; i++)
            hdr[2 + i] = (uint8_t)((uint64_t)n >> (56 - 8 * i));
        h = 10;
    }
    memcpy(hdr + h, MASK, 4);
    return h + 4;
}

static void build_template(void)
{
    size_t b = (size_t)o_size;
    uint8_t hdr[14];
    size_t h = text_header(hdr, b);
    g_tmpl_hdr = h;
    g_tmpl_len = h + b;
    g_tmpl = xrealloc(NULL, g_tmpl_len);
    memcpy(g_tmpl, hdr, h);
    for (size_t i = 0; i < b; i++)
        g_tmpl[h + i] = (uint8_t)('x' ^ MASK[i & 3]);
}

/* Queue one masked text frame of n bytes (not flushed). */
static void send_text(conn *c, const char *text, size_t n)
{
    uint8_t hdr[14];
    size_t h = text_header(hdr, n);
    wreserve(c, h + n);
    uint8_t *w = c->wbuf + c->wlen;
    memcpy(w, hdr, h);
    for (size_t i = 0; i < n; i++)
        w[h + i] = (uint8_t)text[i] ^ MASK[i & 3];
    c->wlen += (uint32_t)(h + n);
}

/* --channels: the channels a publisher publishes to (and subscribes to, for its
 * echoes): pubid, pubid + P, pubid + 2P, ... below K. */
static long pub_channels(const conn *c)
{
    return (o_channels - (long)c->pubid + o_pubs - 1) / o_pubs;
}

/* --channels: subscribe a new connection (a subscriber to channel slot mod K, a
 * publisher to each of its channels). */
static void subscribe_channels(conn *c)
{
    char cmd[96];
    long first = c->is_pub ? (long)c->pubid : (long)(c - conns) % o_channels;
    long count = c->is_pub ? pub_channels(c) : 1, step = c->is_pub ? o_pubs : 0;
    for (long k = 0; k < count; k++) {
        int n = snprintf(cmd, sizeof cmd, "{\"type\":\"subscribe\",\"channel\":\"c%ld\"}",
                         first + k * step);
        send_text(c, cmd, (size_t)n);
    }
}

/* --channels: one publish command, to the publisher's next channel in turn; its
 * text is the usual payload (header, padded with x to --size bytes). */
static void send_channel_msg(conn *c, int64_t now)
{
    static char *cmd;
    size_t cap = (size_t)o_size + 128;
    if (!cmd)
        cmd = xrealloc(NULL, cap);
    long channel = (long)c->pubid + o_pubs * (long)(c->seq % (uint64_t)pub_channels(c));
    int start = snprintf(cmd, cap, "{\"type\":\"publish\",\"channel\":\"c%ld\",\"text\":\"",
                         channel);
    int n = snprintf(cmd + start, cap - (size_t)start, "p%u s%llu t%llu ", c->pubid,
                     (unsigned long long)++c->seq, (unsigned long long)now);
    size_t len = (size_t)start + (size_t)n;
    while (len - (size_t)start < (size_t)o_size)
        cmd[len++] = 'x';
    cmd[len++] = '"';
    cmd[len++] = '}';
    send_text(c, cmd, len);
    c->inflight++;
    c_sent++;
}

/* Queue one publish message (not flushed). */
static void send_msg(conn *c, int64_t now)
{
    if (o_channels) {
        send_channel_msg(c, now);
        return;
    }
    char txt[80], *p = txt;
    *p++ = 'p';
    p = u64toa(p, c->pubid);
    *p++ = ' ';
    *p++ = 's';
    p = u64toa(p, ++c->seq);
    *p++ = ' ';
    *p++ = 't';
    p = u64toa(p, (uint64_t)now);
    *p++ = ' ';
    size_t n = (size_t)(p - txt);
    wreserve(c, g_tmpl_len);
    uint8_t *w = c->wbuf + c->wlen;
    memcpy(w, g_tmpl, g_tmpl_len);
    uint8_t *pl = w + g_tmpl_hdr;
    for (size_t i = 0; i < n; i++)
        pl[i] = (uint8_t)txt[i] ^ MASK[i & 3];
    c->wlen += (uint32_t)g_tmpl_len;
    c->inflight++;
    c_sent++;
}

static void fill_window(conn *c, int64_t now)
{
    while (c->inflight < (uint32_t)o_window)
        send_msg(c, now);
}

/* ---- connection lifecycle ---- */
static void conn_close(conn *c)
{
    if (c->state == ST_CLOSED)
        return;
    if (c->state == ST_NEW) {
        c->state = ST_CLOSED;
        return;
    }
    int was_open = c->state == ST_OPEN;
    int was_pending = c->state == ST_CONNECTING || c->state == ST_HANDSHAKE;
    close(c->fd); /* also removes it from epoll */
    c->fd = -1;
    c->state = ST_CLOSED;
    free(c->rbuf);
    free(c->wbuf);
    c->rbuf = c->wbuf = NULL;
    c->rlen = c->rcap = c->wlen = c->woff = c->wcap = 0;
    c->want_out = 0;
    if (was_open)
        n_open--;
    if (was_pending) {
        pending--;
        n_done++;
        if (c->move_from) { /* a move's new connection failed: the old one retries */
            conn *old = &conns[c->move_from - 1];
            e_move_failed++;
            if (old->state == ST_OPEN)
                old->t_move_due = mono_ns() + 100000000LL;
        }
    }
}

/* Server closed (close frame, EOF or error) an open connection. */
static void conn_lost(conn *c, int64_t now, int kind /* 0 eof, 1 close frame, 2 error */)
{
    if (!c->t_close)
        c->t_close = now;
    if (kind == 0)
        c_eofs++;
    if (o_mode == MODE_SOAK) {
        /* only a close this side started is expected */
        if (!c->initiated) {
            if (kind == 2)
                e_io++;
            else
                e_unexpected++;
        } else if (kind == 2) {
            e_io++;
        }
    } else if (phase != PH_CLOSING && o_mode != MODE_EXPECT_CLOSE) {
        if (kind == 2)
            e_io++;
        else
            e_unexpected++;
    }
    conn_close(c);
}

static void launch(conn *c, int64_t now)
{
    int fd = socket(g_addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        if ((errno == EMFILE || errno == ENFILE) && !c->move_from)
            die("socket: %s (connection %ld)", strerror(errno), (long)(c - conns));
        if (c->move_from) { /* out of descriptors here: the old one retries (not counted
                             * as a failed handshake: nothing reached the server) */
            conn *old = &conns[c->move_from - 1];
            e_move_nofd++;
            c->state = ST_CLOSED;
            if (old->state == ST_OPEN)
                old->t_move_due = now + 100000000LL;
            return;
        }
        e_connect++;
        c->state = ST_CLOSED;
        n_done++;
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (g_nsources) {
        /* the kernel picks the port at connect(), unique per 4-tuple: each source
         * address adds a whole ephemeral range */
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        struct sockaddr_in *src = &g_sources[g_next_source++ % g_nsources];
        if (bind(fd, (struct sockaddr *)src, sizeof *src) < 0) {
            if (e_connect < 5)
                logmsg("bind: %s", strerror(errno));
            close(fd);
            e_connect++;
            c->state = ST_CLOSED;
            n_done++;
            return;
        }
    }
    c->fd = fd;
    c->t_start = now;
    c->state = ST_CONNECTING;
    pending++;
    int r = connect(fd, (struct sockaddr *)&g_addr, g_addrlen);
    if (r < 0 && errno != EINPROGRESS) {
        if (e_connect < 5)
            logmsg("connect: %s", strerror(errno));
        e_connect++;
        conn_close(c);
        return;
    }
    ep_set(c, EPOLLOUT, EPOLL_CTL_ADD);
    c->want_out = 1;
}

static void on_connected(conn *c)
{
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err) {
        if (e_connect < 5)
            logmsg("connect failed: %s", strerror(err));
        e_connect++;
        conn_close(c);
        return;
    }
    ssize_t n = write(c->fd, g_req, g_reqlen);
    if (n != (ssize_t)g_reqlen) {
        e_handshake++;
        conn_close(c);
        return;
    }
    c->state = ST_HANDSHAKE;
    c->want_out = 0;
    ep_set(c, EPOLLIN, EPOLL_CTL_MOD);
}

static int parse_frames_and_stash(conn *c, uint8_t *buf, size_t len, int64_t now);

static void on_handshake_data(conn *c, int64_t now)
{
    if (c->rcap < HS_MAX + 1) {
        c->rbuf = xrealloc(c->rbuf, HS_MAX + 1);
        c->rcap = HS_MAX + 1;
    }
    ssize_t n = read(c->fd, c->rbuf + c->rlen, HS_MAX - c->rlen);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n <= 0) {
        if (e_handshake < 5)
            logmsg("handshake: %s", n == 0 ? "connection closed by server" : strerror(errno));
        e_handshake++;
        conn_close(c);
        return;
    }
    c->rlen += (uint32_t)n;
    c->rbuf[c->rlen] = 0;
    char *s = (char *)c->rbuf;
    char *end = strstr(s, "\r\n\r\n");
    if (!end) {
        if (c->rlen >= HS_MAX) {
            e_handshake++;
            conn_close(c);
        }
        return;
    }
    *end = 0;
    int ok = !strncmp(s, "HTTP/1.1 101", 12);
    if (ok) {
        /* verify Sec-WebSocket-Accept (case-insensitive header name) */
        ok = 0;
        for (char *l = strstr(s, "\r\n"); l; l = strstr(l + 2, "\r\n")) {
            if (!strncasecmp(l + 2, "sec-websocket-accept:", 21)) {
                char *v = l + 2 + 21;
                while (*v == ' ' || *v == '\t')
                    v++;
                ok = !strncmp(v, WS_ACCEPT, sizeof WS_ACCEPT - 1);
                break;
            }
        }
    }
    if (!ok) {
        if (e_handshake < 5) {
            char *eol = strstr(s, "\r\n");
            if (eol)
                *eol = 0;
            logmsg("handshake rejected: %.200s", s);
        }
        e_handshake++;
        conn_close(c);
        return;
    }
    size_t hlen = (size_t)(end + 4 - s);
    size_t rest = c->rlen - hlen;
    c->state = ST_OPEN;
    c->t_open = now;
    pending--;
    n_done++;
    n_open++;
    n_connected++;
    if (o_mode == MODE_SOAK && first_shutdown)
        c->expect_sd = 1; /* opened during the drain: the server owes it a shutdown frame too */
    if (c->move_from) { /* make before break: the new one is open, leave the old one */
        conn *old = &conns[c->move_from - 1];
        c_moves_done++;
        if (old->state == ST_OPEN) {
            send_close(old, 1001);
            flush_conn(old);
        }
    }
    c->last_echo = now;
    if (o_channels)
        subscribe_channels(c);
    c->rlen = 0;
    if (rest)
        memcpy(g_shared, c->rbuf + hlen, rest);
    free(c->rbuf); /* the handshake buffer is not kept: 10k idle connections stay small */
    c->rbuf = NULL;
    c->rcap = 0;
    if (rest && parse_frames_and_stash(c, g_shared, rest, now) < 0)
        return;
    if (c->state == ST_OPEN && c->wlen)
        flush_conn(c);
}

/* ---- frame handling ---- */
/* Read a decimal number at *pp (advancing it); 0 if there is no digit. */
static int parse_uint(const uint8_t **pp, const uint8_t *e, uint64_t *out)
{
    const uint8_t *p = *pp, *d = p;
    uint64_t v = 0;
    while (p < e && *p >= '0' && *p <= '9')
        v = v * 10 + (uint64_t)(*p++ - '0');
    *pp = p;
    *out = v;
    return p != d;
}

/* Read "<c><number> " at *pp: the tag, its number and the separating space. */
static int parse_field(const uint8_t **pp, const uint8_t *e, uint8_t tag, uint64_t *out,
                       int space_after)
{
    const uint8_t *p = *pp;
    if (p >= e || *p++ != tag || !parse_uint(&p, e, out))
        return 0;
    if (space_after && (p >= e || *p++ != ' '))
        return 0;
    *pp = p;
    return 1;
}

static int parse_at(const uint8_t *p, const uint8_t *e, uint32_t *pub, uint64_t *seq, uint64_t *ts)
{
    uint64_t v;
    if (!parse_field(&p, e, 'p', &v, 1))
        return 0;
    *pub = (uint32_t)v;
    if (!parse_field(&p, e, 's', seq, 1))
        return 0;
    return parse_field(&p, e, 't', ts, 0);
}

/* Find the wsbench header at the start of the payload, or inside a JSON
 * envelope's "text" field (ebbcast's default "json" envelope). */
static int parse_hdr(const uint8_t *p, size_t n, uint32_t *pub, uint64_t *seq, uint64_t *ts)
{
    if (parse_at(p, p + n, pub, seq, ts))
        return 1;
    size_t lim = n < 512 ? n : 512;
    const uint8_t *q = memmem(p, lim, "\"text\":\"", 8);
    if (!q) {
        q = memmem(p, lim, "\"text\": \"", 9);
        if (!q)
            return 0;
        q++;
    }
    return parse_at(q + 8, p + n, pub, seq, ts);
}

static void soak_enter_drain(int64_t now, int by_shutdown);

/* Soak: a connection must see each publisher's seq strictly increase. A gap is
 * counted too (a lost message), except before the first delivery on a
 * connection that joined mid-stream. */
static void check_order(conn *c, uint32_t pub, uint64_t seq)
{
    if ((long)pub >= o_pubs)
        return; /* not one of this run's publishers */
    uint64_t *last = &g_last_seq[(size_t)(c - conns) * (size_t)o_pubs + pub];
    if (!*last) {
        if (!c->mid && seq != 1)
            c_gaps++;
    } else if (seq <= *last) {
        c_ooo++;
        return;
    } else if (seq != *last + 1) {
        c_gaps++;
    }
    *last = seq;
}

/* Soak, ebbcast json envelope: the first frame is the welcome; periodic seq increases. */
static void check_envelope(conn *c, const uint8_t *p, size_t n)
{
    static const char W[] = "{\"type\":\"welcome\"";
    static const char P[] = "{\"type\":\"periodic\",\"seq\":";
    if (!c->got_frame) {
        c->got_frame = 1;
        if (n < sizeof W - 1 || memcmp(p, W, sizeof W - 1))
            c_welcome_not_first++;
        return;
    }
    if (n > sizeof P - 1 && !memcmp(p, P, sizeof P - 1)) {
        const uint8_t *q = p + sizeof P - 1, *e = p + n, *d = q;
        uint64_t v = 0;
        while (q < e && *q >= '0' && *q <= '9')
            v = v * 10 + (uint64_t)(*q++ - '0');
        if (q == d)
            return;
        c_periodic++;
        if (c->t_shutdown)
            c_periodic_after_shutdown++;
        if (v <= c->last_periodic)
            c_periodic_ooo++;
        else
            c->last_periodic = v;
    }
}

static void on_message(conn *c, int ok, uint32_t pub, uint64_t seq, uint64_t ts, int64_t now)
{
    if (!ok) {
        c_other++;
        return;
    }
    c_delivered++;
    if (o_mode == MODE_SOAK) {
        check_order(c, pub, seq);
        if (c->t_shutdown)
            c_after_shutdown++;
    }
    if (g_measuring)
        hrecord(now > (int64_t)ts ? (uint64_t)(now - (int64_t)ts) : 0);
    if (c->is_pub && pub == c->pubid) {
        c_echoes++;
        c->last_echo = now;
        if (c->inflight)
            c->inflight--;
        if (g_publishing && !c->pub_stopped)
            fill_window(c, now);
    }
}

/* The number after `key` in a JSON text (0 if absent). */
static double json_number(const uint8_t *p, size_t n, const char *key)
{
    const uint8_t *q = memmem(p, n, key, strlen(key));
    if (!q)
        return 0;
    char buf[40];
    size_t off = (size_t)(q - p) + strlen(key), k = 0;
    while (off < n && k < sizeof buf - 1 && (p[off] == ' ' || p[off] == '.' || p[off] == '-' ||
                                           (p[off] >= '0' && p[off] <= '9')))
        buf[k++] = (char)p[off++];
    buf[k] = 0;
    return strtod(buf, NULL);
}

/* A periodic frame: its delivery latency, and (slot 0) its stamp. */
static void note_periodic(conn *c, const uint8_t *p, size_t n)
{
    static const char P[] = "{\"type\":\"periodic\",";
    if (n < sizeof P - 1 || memcmp(p, P, sizeof P - 1) || c->t_shutdown)
        return;
    double ts = json_number(p, n, "\"ts\":");
    if (ts <= 0)
        return;
    double late_us = ((double)real_ns() / 1e9 - ts) * 1e6;
    if (g_periodic_n == g_periodic_cap) {
        g_periodic_cap = g_periodic_cap ? 2 * g_periodic_cap : 65536;
        g_periodic_us = xrealloc(g_periodic_us, g_periodic_cap * sizeof *g_periodic_us);
    }
    g_periodic_us[g_periodic_n++] = late_us > 0 ? (uint32_t)late_us : 0;
    if (c == conns && g_nstamps < sizeof g_stamps / sizeof *g_stamps)
        g_stamps[g_nstamps++] = ts;
}

static void check_shutdown(conn *c, const uint8_t *p, size_t n, int64_t now)
{
    if (o_mode != MODE_EXPECT_CLOSE && o_mode != MODE_SOAK)
        return;
    if (!memmem(p, n, "\"type\":\"shutdown\"", 17) && !memmem(p, n, "\"type\": \"shutdown\"", 18))
        return;
    if (o_follow_upgrade && memmem(p, n, "\"reason\":\"upgrade\"", 18)) {
        if (!c->t_move_due) /* move after the delay the server gave this client */
            c->t_move_due = now + (int64_t)(json_number(p, n, "\"reconnect_after_ms\":") * 1e6) + 1;
        if (!c->t_shutdown)
            c_shutdown_frames++;
        c->t_shutdown = c->t_shutdown ? c->t_shutdown : now;
        return;
    }
    if (c->t_shutdown && !c->t_move_due) {
        c_dup_shutdown++;
        return;
    }
    c->t_shutdown = now;
    c_shutdown_frames++;
    if (o_mode == MODE_SOAK) {
        c->pub_stopped = 1; /* a publisher stops publishing on its shutdown frame */
        if (!first_shutdown)
            soak_enter_drain(now, 1);
    }
}

/* Returns 0 normally, -1 if the connection was closed. */
static int handle_frame(conn *c, int fin, int op, uint8_t *p, size_t n, int64_t now)
{
    uint32_t pub = 0;
    uint64_t ts = 0, seq = 0;
    switch (op) {
    case 1: /* text */
        check_shutdown(c, p, n, now);
        if (o_mode == MODE_IDLE || o_mode == MODE_EXPECT_CLOSE)
            note_periodic(c, p, n);
        if (o_mode == MODE_SOAK)
            check_envelope(c, p, n);
        if (fin) {
            int ok = parse_hdr(p, n, &pub, &seq, &ts);
            on_message(c, ok, pub, seq, ts, now);
        } else {
            c_fragmented++;
            c->frag = 1;
            c->frag_valid = (uint8_t)parse_hdr(p, n, &c->frag_pub, &c->frag_seq, &c->frag_ts);
        }
        return 0;
    case 2: /* binary */
        if (fin)
            c_other++;
        else
            c->frag = 2;
        return 0;
    case 0: /* continuation */
        if (c->frag == 1)
            check_shutdown(c, p, n, now);
        if (fin) {
            if (c->frag == 1)
                on_message(c, c->frag_valid, c->frag_pub, c->frag_seq, c->frag_ts, now);
            else if (c->frag == 2)
                c_other++;
            c->frag = 0;
        }
        return 0;
    case 8: { /* close */
        uint16_t code = n >= 2 ? (uint16_t)((p[0] << 8) | p[1]) : 0;
        c->close_code = code ? code : 1005;
        c_close_frames++;
        send_close(c, code);
        flush_conn(c);
        if (c->state == ST_OPEN)
            conn_lost(c, now, 1);
        else if (!c->t_close)
            c->t_close = now;
        return -1;
    }
    case 9: /* ping -> pong with the same payload */
        c_pings++;
        queue_ctrl(c, 10, p, n);
        return 0;
    case 10: /* pong */
        return 0;
    default:
        e_protocol++;
        conn_close(c);
        return -1;
    }
}

/* Parse complete frames in buf[0..len); keep the incomplete tail in c->rbuf.
 * Returns -1 if the connection was closed. */
static int parse_frames_and_stash(conn *c, uint8_t *buf, size_t len, int64_t now)
{
    size_t off = 0;
    c->need = 0;
    while (len - off >= 2) {
        uint8_t *f = buf + off;
        size_t avail = len - off;
        uint64_t plen = f[1] & 0x7f;
        size_t hl = 2;
        if (plen == 126) {
            if (avail < 4)
                break;
            plen = ((uint64_t)f[2] << 8) | f[3];
            hl = 4;
        } else if (plen == 127) {
            if (avail < 10)
                break;
            plen = 0;
            for (int i = 0; i < 8; i++)
                plen = (plen << 8) | f[2 + i];
            hl = 10;
        }
        int masked = f[1] & 0x80;
        if (masked)
            hl += 4;
        if (plen > MAX_FRAME) {
            e_protocol++;
            conn_close(c);
            return -1;
        }
        if (avail < hl + plen) {
            c->need = hl + plen;
            break;
        }
        uint8_t *p = f + hl;
        if (masked) /* servers must not mask, but be lenient */
            for (uint64_t i = 0; i < plen; i++)
                p[i] ^= f[hl - 4 + (i & 3)];
        if (handle_frame(c, f[0] & 0x80, f[0] & 0x0f, p, (size_t)plen, now) < 0)
            return -1;
        off += hl + (size_t)plen;
    }
    size_t rest = len - off;
    if (buf == c->rbuf) {
        if (rest && off)
            memmove(c->rbuf, c->rbuf + off, rest);
        if (rest < 4096 && c->rcap > SMALL_MAX) { /* big frame done: shrink */
            c->rbuf = xrealloc(c->rbuf, 4096);
            c->rcap = 4096;
        }
    } else if (rest) {
        if (c->rcap < rest) {
            size_t cap = rest < 256 ? 256 : rest;
            c->rbuf = xrealloc(c->rbuf, cap);
            c->rcap = (uint32_t)cap;
        }
        memcpy(c->rbuf, buf + off, rest);
    }
    c->rlen = (uint32_t)rest;
    return 0;
}

static void on_readable(conn *c)
{
    for (int iter = 0; iter < 4; iter++) {
        uint8_t *buf;
        size_t have = c->rlen, cap;
        if (have > SMALL_MAX) {
            /* a big frame is arriving: read straight into its own buffer */
            size_t want = (size_t)c->need + READ_SZ;
            if (c->rcap < want) {
                c->rbuf = xrealloc(c->rbuf, want);
                c->rcap = (uint32_t)want;
            }
            buf = c->rbuf;
            cap = c->rcap - have;
        } else {
            if (have)
                memcpy(g_shared, c->rbuf, have);
            buf = g_shared;
            cap = READ_SZ;
        }
        ssize_t n = read(c->fd, buf + have, cap);
        int64_t now = mono_ns();
        c_reads++;
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            if (errno == EINTR)
                continue;
            conn_lost(c, now, 2);
            return;
        }
        if (n == 0) {
            conn_lost(c, now, 0);
            return;
        }
        if (parse_frames_and_stash(c, buf, have + (size_t)n, now) < 0)
            return;
        if (c->wlen && flush_conn(c) < 0)
            return;
        if ((size_t)n < cap)
            return;
    }
}

static void on_event(conn *c, uint32_t ev)
{
    switch (c->state) {
    case ST_CONNECTING:
        on_connected(c);
        return;
    case ST_HANDSHAKE:
        on_handshake_data(c, mono_ns());
        return;
    case ST_OPEN:
        if (ev & EPOLLOUT) {
            if (flush_conn(c) < 0)
                return;
        }
        if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP))
            on_readable(c);
        return;
    default:
        return;
    }
}

/* ---- reporting ---- */
typedef struct {
    long count;
    int64_t min, p50, p90, p99, max;
} tstats;

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static tstats time_stats(int which /* 0 shutdown, 1 close, 2 handshake duration */)
{
    tstats s;
    memset(&s, 0, sizeof s);
    int64_t *v = xrealloc(NULL, sizeof(int64_t) * (size_t)(total ? total : 1));
    long n = 0;
    for (long i = 0; i < total; i++) {
        int64_t t = which == 2 ? (conns[i].t_open ? conns[i].t_open - conns[i].t_start : 0)
                    : which ? conns[i].t_close : conns[i].t_shutdown;
        if (t)
            v[n++] = t;
    }
    s.count = n;
    if (n) {
        qsort(v, (size_t)n, sizeof *v, cmp_i64);
        s.min = v[0];
        s.max = v[n - 1];
        s.p50 = v[(long)(0.50 * (double)(n - 1))];
        s.p90 = v[(long)(0.90 * (double)(n - 1))];
        s.p99 = v[(long)(0.99 * (double)(n - 1))];
    }
    free(v);
    return s;
}

static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            fprintf(f, "\\%c", *s);
        else if ((unsigned char)*s < 0x20)
            fprintf(f, "\\u%04x", *s);
        else
            fputc(*s, f);
    }
    fputc('"', f);
}

static void json_tstats(FILE *f, const char *name, tstats s, int64_t off)
{
    fprintf(f, "\"%s\":{\"count\":%ld", name, s.count);
    if (s.count)
        fprintf(f,
                ",\"min_mono_ns\":%" PRId64 ",\"p50_mono_ns\":%" PRId64 ",\"p90_mono_ns\":%" PRId64
                ",\"p99_mono_ns\":%" PRId64 ",\"max_mono_ns\":%" PRId64 ",\"min_realtime_ns\":%" PRId64
                ",\"max_realtime_ns\":%" PRId64 ",\"spread_ms\":%.3f,\"first_after_ready_ms\":%.3f",
                s.min, s.p50, s.p90, s.p99, s.max, s.min + off, s.max + off, (double)(s.max - s.min) / 1e6,
                (double)(s.min - ready_mono) / 1e6);
    fputc('}', f);
}

static const char *mode_name(void)
{
    return o_mode == MODE_IDLE ? "idle" : o_mode == MODE_EXPECT_CLOSE ? "expect_close" : o_mode == MODE_SOAK ? "soak" : "publish";
}

static void report_soak(void)
{
    double dur = (double)(meas_end - meas_start) / 1e9;
    if (dur < 0)
        dur = 0;
    double cpu = ru_secs(&ru_end) - ru_secs(&ru_start);
    double srv = (srv_cpu_start >= 0 && srv_cpu_end >= 0) ? srv_cpu_end - srv_cpu_start : -1;
    uint64_t errors = e_connect + e_handshake + e_timeout + e_unexpected + e_io + e_protocol + e_close_timeout;
    long expected = 0, without = 0, initiated = 0;
    int64_t last_sd = 0, last_close = 0, last_close_sent = 0;
    for (long i = 0; i < total; i++) {
        conn *c = &conns[i];
        if (c->expect_sd) {
            expected++;
            if (!c->t_shutdown)
                without++;
        }
        if (c->initiated)
            initiated++;
        if (c->t_shutdown > last_sd)
            last_sd = c->t_shutdown;
        if (c->t_close > last_close)
            last_close = c->t_close;
        if (c->t_close_sent > last_close_sent)
            last_close_sent = c->t_close_sent;
    }
    int64_t rt_off = ready_real - ready_mono;

    fprintf(stderr,
            "wsbench: soak mode, %ld subscribers + %ld publishers (window %ld); churn %ld every %g ms for %g s; "
            "linger %g ms\n",
            o_subs, o_pubs, o_window, o_churn, o_churn_every_ms, o_duration, o_linger_ms);
    fprintf(stderr,
            "  connected %ld in all (%ld at start, in %.3f s), churned %" PRIu64 "; errors %" PRIu64 " (connect %" PRIu64
            ", handshake %" PRIu64 ", timeout %" PRIu64 ", unexpected close %" PRIu64 ", io %" PRIu64
            ", protocol %" PRIu64 ", close timeout %" PRIu64 ")\n",
            n_connected, n_initial, (double)(ramp_end - ramp_start) / 1e9, c_churned, errors, e_connect, e_handshake,
            e_timeout, e_unexpected, e_io, e_protocol, e_close_timeout);
    fprintf(stderr,
            "  %.3f s: sent %" PRIu64 ", delivered %" PRIu64 " (%.0f/s; %" PRIu64 " after a shutdown frame), periodic %" PRIu64
            " (%" PRIu64 " after), other frames %" PRIu64 ", window resets %" PRIu64 "\n",
            dur, c_sent, c_delivered, dur > 0 ? (double)c_delivered / dur : 0, c_after_shutdown, c_periodic,
            c_periodic_after_shutdown, c_other, c_stalls);
    fprintf(stderr, "  latency us: p50 %.1f  p90 %.1f  p99 %.1f  p99.9 %.1f  max %.1f  (n=%" PRIu64 ")\n", hpct(0.5) / 1e3,
            hpct(0.9) / 1e3, hpct(0.99) / 1e3, hpct(0.999) / 1e3, h_max / 1e3, h_count);
    fprintf(stderr,
            "  order: out of order %" PRIu64 ", gaps %" PRIu64 ", periodic out of order %" PRIu64
            ", welcome not first %" PRIu64 "\n",
            c_ooo, c_gaps, c_periodic_ooo, c_welcome_not_first);
    fprintf(stderr,
            "  drain: %ld open at the first shutdown frame, %" PRIu64 " shutdown frames (%" PRIu64
            " duplicates), %ld without one; %ld closes sent, %" PRIu64 " close frames back, %" PRIu64 " EOF\n",
            expected, c_shutdown_frames, c_dup_shutdown, without, initiated, c_close_frames, c_eofs);
    if (first_shutdown)
        fprintf(stderr, "  drain: shutdown frames over %.3f ms; last close %.3f ms after the first shutdown frame\n",
                (double)(last_sd - first_shutdown) / 1e6, (double)(last_close - first_shutdown) / 1e6);
    fprintf(stderr, "  client cpu %.3f s (%.1f%% of one core)", cpu, dur > 0 ? 100 * cpu / dur : 0);
    if (srv >= 0)
        fprintf(stderr, "; server cpu %.3f s (%.1f%% of one core)", srv, dur > 0 ? 100 * srv / dur : 0);
    fputc('\n', stderr);

    if (!o_json)
        return;
    FILE *f = stdout;
    fputs("{\"tool\":\"wsbench\",\"mode\":\"soak\",\"host\":", f);
    json_str(f, o_host);
    fprintf(f, ",\"port\":%d,\"path\":", o_port);
    json_str(f, o_path);
    fprintf(f,
            ",\"subscribers\":%ld,\"publishers\":%ld,\"connections\":%ld,\"window\":%ld,\"size\":%ld"
            ",\"duration_s\":%.6f,\"churn\":%ld,\"churn_every_ms\":%g,\"linger_ms\":%g,\"shutdown_wait_s\":%g"
            ",\"seed\":%" PRIu64,
            o_subs, o_pubs, n_initial, o_window, o_size, dur, o_churn, o_churn_every_ms, o_linger_ms, o_shutdown_wait,
            o_seed);
    fprintf(f,
            ",\"connected\":%ld,\"connected_total\":%ld,\"connect_seconds\":%.6f,\"churned\":%" PRIu64
            ",\"churn_opened\":%" PRIu64,
            n_connected, n_connected, (double)(ramp_end - ramp_start) / 1e9, c_churned, c_churn_opened);
    fprintf(f,
            ",\"sent\":%" PRIu64 ",\"delivered\":%" PRIu64 ",\"delivered_per_s\":%.1f,\"delivered_after_shutdown\":%" PRIu64
            ",\"periodic_frames\":%" PRIu64 ",\"periodic_after_shutdown\":%" PRIu64 ",\"other_frames\":%" PRIu64
            ",\"window_resets\":%" PRIu64,
            c_sent, c_delivered, dur > 0 ? (double)c_delivered / dur : 0, c_after_shutdown, c_periodic,
            c_periodic_after_shutdown, c_other, c_stalls);
    fprintf(f,
            ",\"latency_us\":{\"count\":%" PRIu64 ",\"mean\":%.1f,\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f"
            ",\"p999\":%.1f,\"max\":%.1f}",
            h_count, h_count ? h_sum / (double)h_count / 1e3 : 0, hpct(0.5) / 1e3, hpct(0.9) / 1e3,
            hpct(0.99) / 1e3, hpct(0.999) / 1e3, h_max / 1e3);
    fprintf(f,
            ",\"out_of_order\":%" PRIu64 ",\"gaps\":%" PRIu64 ",\"periodic_out_of_order\":%" PRIu64
            ",\"welcome_not_first\":%" PRIu64,
            c_ooo, c_gaps, c_periodic_ooo, c_welcome_not_first);
    fprintf(f,
            ",\"shutdown_frames\":%" PRIu64 ",\"duplicate_shutdown_frames\":%" PRIu64
            ",\"connections_open_at_shutdown\":%ld,\"clients_without_shutdown_frame\":%ld"
            ",\"closes_sent\":%ld,\"close_frames\":%" PRIu64 ",\"eofs\":%" PRIu64,
            c_shutdown_frames, c_dup_shutdown, expected, without, initiated, c_close_frames, c_eofs);
    fprintf(f,
            ",\"errors\":%" PRIu64 ",\"error_detail\":{\"connect\":%" PRIu64 ",\"handshake\":%" PRIu64
            ",\"timeout\":%" PRIu64 ",\"unexpected_close\":%" PRIu64 ",\"io\":%" PRIu64 ",\"protocol\":%" PRIu64
            ",\"close_timeout\":%" PRIu64 "}",
            errors, e_connect, e_handshake, e_timeout, e_unexpected, e_io, e_protocol, e_close_timeout);
    fprintf(f,
            ",\"ready_mono_ns\":%" PRId64 ",\"ready_realtime_ns\":%" PRId64 ",\"realtime_offset_ns\":%" PRId64
            ",\"steady_mono_ns\":%" PRId64 ",\"first_shutdown_mono_ns\":%" PRId64 ",\"last_shutdown_mono_ns\":%" PRId64
            ",\"last_close_sent_mono_ns\":%" PRId64 ",\"last_close_mono_ns\":%" PRId64,
            ready_mono, ready_real, rt_off, steady_mono, first_shutdown, last_sd, last_close_sent, last_close);
    fprintf(f,
            ",\"loop\":{\"epoll_waits\":%" PRIu64 ",\"events\":%" PRIu64 ",\"reads\":%" PRIu64
            "},\"pings_answered\":%" PRIu64 ",\"fragmented_messages\":%" PRIu64,
            s_epoll_waits, s_events, s_reads, c_pings, c_fragmented);
    fprintf(f, ",\"client_cpu_s\":%.6f,\"client_cpu_share\":%.6f", cpu, dur > 0 ? cpu / dur : 0);
    if (srv >= 0)
        fprintf(f, ",\"server_cpu_s\":%.6f,\"server_cpu_share\":%.6f", srv, dur > 0 ? srv / dur : 0);
    if (srv_rss_ready >= 0)
        fprintf(f, ",\"server_rss_kib_ready\":%ld,\"server_rss_kib_end\":%ld", srv_rss_ready, srv_rss_end);
    fputs("}\n", f);
    fflush(f);
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static void report_periodic(FILE *f)
{
    size_t n = g_periodic_n;
    if (n)
        qsort(g_periodic_us, n, sizeof *g_periodic_us, cmp_u32);
#define PCT(q) (n ? g_periodic_us[(size_t)((q) * (double)(n - 1))] : 0)
    fprintf(f, ",\"periodic_latency_us\":{\"count\":%zu,\"p50\":%u,\"p90\":%u,\"p99\":%u,\"max\":%u}", n,
            PCT(0.5), PCT(0.9), PCT(0.99), n ? g_periodic_us[n - 1] : 0);
#undef PCT
    /* every latency, in whole milliseconds: {"ms": count, ...} (sorted, so runs) */
    fputs(",\"periodic_latency_ms_counts\":{", f);
    for (size_t i = 0; i < n;) {
        uint32_t ms = g_periodic_us[i] / 1000;
        size_t j = i;
        while (j < n && g_periodic_us[j] / 1000 == ms)
            j++;
        fprintf(f, "%s\"%u\":%zu", i ? "," : "", ms, j - i);
        i = j;
    }
    fputc('}', f);
    fputs(",\"periodic_stamps\":[", f);
    for (size_t i = 0; i < g_nstamps; i++)
        fprintf(f, "%s%.3f", i ? "," : "", g_stamps[i]);
    fputc(']', f);
}

static void report_moves(FILE *f, int64_t rt_off)
{
    fprintf(f, ",\"moves\":{\"started\":%" PRIu64 ",\"done\":%" PRIu64 ",\"failed\":%" PRIu64
               ",\"no_descriptor\":%" PRIu64 "}",
            c_moves_started, c_moves_done, e_move_failed, e_move_nofd);
    fputs(",\"move_open_realtime_ms\":[", f);
    int first = 1;
    for (long i = 0; i < total; i++) {
        if (!conns[i].move_from || !conns[i].t_open)
            continue;
        fprintf(f, "%s%" PRId64, first ? "" : ",", (conns[i].t_open + rt_off) / 1000000);
        first = 0;
    }
    fputc(']', f);
}

static void report(void)
{
    if (o_mode == MODE_SOAK) {
        report_soak();
        return;
    }
    double dur = (double)(meas_end - meas_start) / 1e9;
    if (dur < 0)
        dur = 0;
    double cpu = ru_secs(&ru_end) - ru_secs(&ru_start);
    uint64_t sent = s_sent, deliv = s_delivered;
    uint64_t errors = e_connect + e_handshake + e_timeout + e_unexpected + e_io + e_protocol;
    double conn_s = (double)(ramp_end - ramp_start) / 1e9;
    double srv = (srv_cpu_start >= 0 && srv_cpu_end >= 0) ? srv_cpu_end - srv_cpu_start : -1;
    int64_t rt_off = ready_real - ready_mono;
    tstats sh = time_stats(0), cl = time_stats(1);

    /* human summary */
    fprintf(stderr, "wsbench: %s mode, %ld connections (%ld subscribers + %ld publishers)\n", mode_name(), total,
            o_subs, o_pubs);
    fprintf(stderr, "  connected %ld in %.3f s; errors %" PRIu64
                    " (connect %" PRIu64 ", handshake %" PRIu64 ", timeout %" PRIu64 ", unexpected close %" PRIu64
                    ", io %" PRIu64 ", protocol %" PRIu64 ")\n",
            n_connected, conn_s, errors, e_connect, e_handshake, e_timeout, e_unexpected, e_io, e_protocol);
    if (o_mode == MODE_PUBLISH) {
        fprintf(stderr,
                "  measured %.3f s: sent %" PRIu64 " (%.0f/s), delivered %" PRIu64 " (%.0f/s), other frames %" PRIu64
                ", window resets %" PRIu64 "\n",
                dur, sent, dur > 0 ? sent / dur : 0, deliv, dur > 0 ? deliv / dur : 0, s_other, c_stalls);
        fprintf(stderr, "  latency us: p50 %.1f  p90 %.1f  p99 %.1f  p99.9 %.1f  max %.1f  (n=%" PRIu64 ")\n",
                hpct(0.5) / 1e3, hpct(0.9) / 1e3, hpct(0.99) / 1e3, hpct(0.999) / 1e3, h_max / 1e3, h_count);
    } else {
        fprintf(stderr, "  held %.3f s, frames received %" PRIu64 "\n", dur, s_delivered + s_other);
    }
    if (o_mode == MODE_EXPECT_CLOSE) {
        fprintf(stderr, "  shutdown frames %ld, closes %ld (close frames %" PRIu64 ", EOF %" PRIu64 ")\n", sh.count,
                cl.count, c_close_frames, c_eofs);
        if (sh.count)
            fprintf(stderr, "  shutdown: first %.3f ms after ready, spread %.3f ms\n",
                    (double)(sh.min - ready_mono) / 1e6, (double)(sh.max - sh.min) / 1e6);
        if (cl.count)
            fprintf(stderr, "  close:    first %.3f ms after ready, spread %.3f ms\n",
                    (double)(cl.min - ready_mono) / 1e6, (double)(cl.max - cl.min) / 1e6);
    }
    fprintf(stderr,
            "  loop: %" PRIu64 " epoll_wait, %" PRIu64 " events, %" PRIu64 " reads; pings answered %" PRIu64
            ", fragmented messages %" PRIu64 " (whole run)\n",
            s_epoll_waits, s_events, s_reads, c_pings, c_fragmented);
    fprintf(stderr, "  client cpu %.3f s (%.1f%% of one core; user %.3f, sys %.3f)", cpu, dur > 0 ? 100 * cpu / dur : 0,
            (double)(ru_end.ru_utime.tv_sec - ru_start.ru_utime.tv_sec) +
                (double)(ru_end.ru_utime.tv_usec - ru_start.ru_utime.tv_usec) / 1e6,
            (double)(ru_end.ru_stime.tv_sec - ru_start.ru_stime.tv_sec) +
                (double)(ru_end.ru_stime.tv_usec - ru_start.ru_stime.tv_usec) / 1e6);
    if (srv >= 0)
        fprintf(stderr, "; server cpu %.3f s (%.1f%% of one core)", srv, dur > 0 ? 100 * srv / dur : 0);
    if (srv_rss_ready >= 0)
        fprintf(stderr, "; server rss %ld KiB at ready, %ld KiB at end", srv_rss_ready, srv_rss_end);
    fputc('\n', stderr);

    if (!o_json)
        return;
    FILE *f = stdout;
    fprintf(f, "{\"tool\":\"wsbench\",\"mode\":\"%s\",\"host\":", mode_name());
    json_str(f, o_host);
    fprintf(f, ",\"port\":%d,\"path\":", o_port);
    json_str(f, o_path);
    fprintf(f,
            ",\"subscribers\":%ld,\"publishers\":%ld,\"connections\":%ld,\"window\":%ld,\"size\":%ld"
            ",\"warmup_s\":%.3f,\"duration_s\":%.6f,\"connected\":%ld,\"connect_seconds\":%.6f",
            o_subs, o_pubs, total, o_window, o_size, o_mode == MODE_PUBLISH ? o_warmup : 0.0, dur, n_connected,
            conn_s);
    fprintf(f,
            ",\"sent\":%" PRIu64 ",\"sent_per_s\":%.1f,\"delivered\":%" PRIu64 ",\"delivered_per_s\":%.1f"
            ",\"other_frames\":%" PRIu64 ",\"window_resets\":%" PRIu64,
            sent, dur > 0 ? sent / dur : 0, deliv, dur > 0 ? deliv / dur : 0, s_other, c_stalls);
    fprintf(f,
            ",\"latency_us\":{\"count\":%" PRIu64 ",\"mean\":%.1f,\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f"
            ",\"p999\":%.1f,\"max\":%.1f}",
            h_count, h_count ? h_sum / (double)h_count / 1e3 : 0, hpct(0.5) / 1e3, hpct(0.9) / 1e3,
            hpct(0.99) / 1e3, hpct(0.999) / 1e3, h_max / 1e3);
    fprintf(f,
            ",\"errors\":%" PRIu64 ",\"error_detail\":{\"connect\":%" PRIu64 ",\"handshake\":%" PRIu64
            ",\"timeout\":%" PRIu64 ",\"unexpected_close\":%" PRIu64 ",\"io\":%" PRIu64 ",\"protocol\":%" PRIu64 "}",
            errors, e_connect, e_handshake, e_timeout, e_unexpected, e_io, e_protocol);
    fprintf(f,
            ",\"poll_us\":%.0f,\"loop\":{\"epoll_waits\":%" PRIu64 ",\"events\":%" PRIu64 ",\"reads\":%" PRIu64
            "},\"pings_answered\":%" PRIu64 ",\"fragmented_messages\":%" PRIu64,
            o_poll_us, s_epoll_waits, s_events, s_reads, c_pings, c_fragmented);
    fprintf(f, ",\"client_cpu_s\":%.6f,\"client_cpu_share\":%.6f", cpu, dur > 0 ? cpu / dur : 0);
    if (srv >= 0)
        fprintf(f, ",\"server_cpu_s\":%.6f,\"server_cpu_share\":%.6f", srv, dur > 0 ? srv / dur : 0);
    if (srv_rss_ready >= 0)
        fprintf(f, ",\"server_rss_kib_ready\":%ld,\"server_rss_kib_end\":%ld", srv_rss_ready, srv_rss_end);
    if (srv_cpu_ramp_start >= 0 && srv_cpu_ramp_end >= 0)
        fprintf(f, ",\"connect_server_cpu_s\":%.6f", srv_cpu_ramp_end - srv_cpu_ramp_start);
    tstats hs = time_stats(2);
    fprintf(f, ",\"handshake_us\":{\"count\":%ld,\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,\"max\":%.1f}",
            hs.count, (double)hs.p50 / 1e3, (double)hs.p90 / 1e3, (double)hs.p99 / 1e3, (double)hs.max / 1e3);
    if (o_mode != MODE_PUBLISH)
        fprintf(f, ",\"ready_mono_ns\":%" PRId64 ",\"ready_realtime_ns\":%" PRId64, ready_mono, ready_real);
    if (o_mode == MODE_IDLE || o_mode == MODE_EXPECT_CLOSE)
        report_periodic(f);
    if (o_follow_upgrade)
        report_moves(f, rt_off);
    if (o_mode == MODE_EXPECT_CLOSE) {
        fprintf(f, ",\"shutdown_frames\":%ld,\"closes\":%ld,\"close_frames\":%" PRIu64 ",\"eofs\":%" PRIu64,
                sh.count, cl.count, c_close_frames, c_eofs);
        /* close codes seen (few distinct values) */
        uint16_t codes[16];
        long counts[16];
        int nc = 0;
        for (long i = 0; i < total; i++) {
            uint16_t cc = conns[i].close_code;
            if (!cc)
                continue;
            int k = 0;
            while (k < nc && codes[k] != cc)
                k++;
            if (k == nc) {
                if (nc == 16)
                    continue;
                codes[nc] = cc;
                counts[nc++] = 0;
            }
            counts[k]++;
        }
        fputs(",\"close_codes\":{", f);
        for (int k = 0; k < nc; k++)
            fprintf(f, "%s\"%u\":%ld", k ? "," : "", codes[k], counts[k]);
        fputc('}', f);
        fputc(',', f);
        json_tstats(f, "shutdown", sh, rt_off);
        fputc(',', f);
        json_tstats(f, "close", cl, rt_off);
    }
    fputs("}\n", f);
    fflush(f);
}

/* ---- phases ---- */
static void start_measure(int64_t now)
{
    meas_start = now;
    s_sent = c_sent;
    s_delivered = c_delivered;
    s_other = c_other;
    s_epoll_waits = c_epoll_waits;
    s_events = c_events;
    s_reads = c_reads;
    getrusage(RUSAGE_SELF, &ru_start);
    srv_cpu_start = server_cpu();
    g_measuring = 1;
}

static void end_measure(int64_t now)
{
    meas_end = now;
    getrusage(RUSAGE_SELF, &ru_end);
    srv_cpu_end = server_cpu();
    srv_rss_end = server_rss();
    g_measuring = 0;
    s_sent = c_sent - s_sent;
    s_delivered = c_delivered - s_delivered;
    s_other = c_other - s_other;
    s_epoll_waits = c_epoll_waits - s_epoll_waits;
    s_events = c_events - s_events;
    s_reads = c_reads - s_reads;
}

static void start_closing(int64_t now)
{
    g_publishing = 0;
    phase = PH_CLOSING;
    close_deadline = now + (int64_t)(o_close_timeout * 1e9);
    for (long i = 0; i < total; i++) {
        conn *c = &conns[i];
        if (c->state == ST_OPEN) {
            send_close(c, 1000);
            flush_conn(c);
        } else if (c->state == ST_CONNECTING || c->state == ST_HANDSHAKE) {
            conn_close(c);
        }
    }
}

/* ---- soak mode ---- */
#define SCAN_NS 5000000LL /* 5 ms: how often soak mode looks at every connection */

static uint64_t rng_next(void)
{
    uint64_t x = g_rng; /* xorshift64 */
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return g_rng = x;
}

/* Add `add` fresh slots at the end of conns[] (and of the per-slot seq table).
 * Only called from tick(): no conn pointer is held across it. */
static void grow_slots(long add)
{
    long need = total + add;
    if (need > cap_slots) {
        long cap = cap_slots ? cap_slots : 64;
        while (cap < need)
            cap *= 2;
        conns = xrealloc(conns, (size_t)cap * sizeof *conns);
        memset(conns + cap_slots, 0, (size_t)(cap - cap_slots) * sizeof *conns);
        if (o_pubs) {
            size_t per = (size_t)o_pubs;
            g_last_seq = xrealloc(g_last_seq, (size_t)cap * per * sizeof *g_last_seq);
            memset(g_last_seq + (size_t)cap_slots * per, 0, (size_t)(cap - cap_slots) * per * sizeof *g_last_seq);
        }
        cap_slots = cap;
    }
    for (long i = total; i < need; i++)
        conns[i].fd = -1;
    total = need;
}

/* This side leaves: a masked close frame now, the socket closed when the
 * server's close frame (or EOF) arrives, or after --close-timeout. */
static void soak_leave(conn *c, int64_t now)
{
    c->initiated = 1;
    c->t_close_sent = now;
    send_close(c, 1000);
    flush_conn(c);
}

static void churn_round(int64_t now)
{
    long closed = 0;
    for (long k = 0; k < o_churn; k++) {
        for (int tries = 0; tries < 64; tries++) {
            conn *c = &conns[(long)(rng_next() % (uint64_t)total)];
            if (c->is_pub || c->state != ST_OPEN || c->close_sent)
                continue;
            c->churned = 1;
            c_churned++;
            closed++;
            soak_leave(c, now);
            break;
        }
    }
    long base = total;
    grow_slots(closed);
    for (long i = base; i < total; i++) {
        conns[i].mid = 1; /* joins mid-stream: its first seq may be anything */
        c_churn_opened++;
        launch(&conns[i], now);
    }
}

/* Start the drain's closes that are due, and give up on closes the server has
 * not answered in --close-timeout. Returns how many closes are under way. */
static long soak_scan(int64_t now)
{
    long leaving = 0;
    int64_t close_to = (int64_t)(o_close_timeout * 1e9), linger = (int64_t)(o_linger_ms * 1e6);
    for (long i = 0; i < total; i++) {
        conn *c = &conns[i];
        if (c->state != ST_OPEN)
            continue;
        if (!c->close_sent) {
            if (phase != PH_DRAIN || !((c->t_shutdown && now >= c->t_shutdown + linger) || now >= close_all_at))
                continue;
            soak_leave(c, now);
            if (c->state != ST_OPEN)
                continue;
        }
        if (c->initiated && now - c->t_close_sent >= close_to) {
            e_close_timeout++;
            c->t_close = now;
            conn_close(c);
            continue;
        }
        leaving++;
    }
    return leaving;
}

/* The drain: on the first shutdown frame (by_shutdown), or when this side gives
 * up waiting for one or is told to stop (every connection closes now). */
static void soak_enter_drain(int64_t now, int by_shutdown)
{
    int64_t wait = (int64_t)(o_shutdown_wait * 1e9);
    if (by_shutdown && !first_shutdown) {
        long open = 0;
        first_shutdown = now;
        for (long i = 0; i < total; i++) {
            conn *c = &conns[i];
            if (c->state == ST_OPEN && !c->close_sent) {
                c->expect_sd = 1;
                open++;
            }
        }
        logmsg("first shutdown frame: %ld connections open, %ld connecting", open, pending);
        if (phase != PH_DRAIN || close_all_at > now + wait)
            close_all_at = now + wait; /* those still without one close then */
    } else if (!by_shutdown) {
        close_all_at = now;
    }
    phase = PH_DRAIN;
    next_scan = now;
}

static void finish_soak(int64_t now)
{
    for (long i = 0; i < total; i++) {
        conn *c = &conns[i];
        if (c->state == ST_OPEN && !c->t_close)
            c->t_close = now;
        conn_close(c);
    }
    if (!g_measuring)
        start_measure(now);
    end_measure(now);
    if (!ramp_end)
        ramp_end = now;
    if (n_connected < total)
        g_exit_code = 3;
    report();
    phase = PH_EXIT;
}

static void soak_tick(int64_t now)
{
    if (phase == PH_SOAK) {
        if (now >= soak_end) {
            phase = PH_SETTLE;
            logmsg("soak: %.3f s of load and churn done, %" PRIu64 " churned; settling", (double)(now - soak_start) / 1e9,
                   c_churned);
        } else if (o_churn > 0 && o_churn_every_ms > 0 && now >= next_churn) {
            int64_t every = (int64_t)(o_churn_every_ms * 1e6);
            churn_round(now);
            next_churn += every;
            if (next_churn <= now)
                next_churn = now + every;
        }
    }
    if (phase == PH_DRAIN && n_open == 0 && pending == 0) {
        finish_soak(now);
        return;
    }
    if (now < next_scan)
        return;
    next_scan = now + SCAN_NS;
    long leaving = soak_scan(now);
    if (phase == PH_SETTLE && !leaving && !pending) {
        steady_mono = mono_ns();
        fprintf(stderr, "wsbench: steady connected=%ld churned=%" PRIu64 " mono_ns=%" PRId64 "\n", n_open, c_churned,
                steady_mono);
        phase = PH_AWAIT;
        await_deadline = now + (int64_t)(o_shutdown_wait * 1e9);
    } else if (phase == PH_AWAIT && now >= await_deadline) {
        logmsg("no shutdown frame within %g s: closing every connection", o_shutdown_wait);
        soak_enter_drain(now, 0);
    }
}

static void finish(int64_t now)
{
    if (o_mode == MODE_SOAK) {
        finish_soak(now);
        return;
    }
    if (!g_measuring) /* stopped before measuring started */
        start_measure(now);
    end_measure(now);
    if (!ramp_end)
        ramp_end = now;
    report();
    start_closing(now);
}

static void ramp_done(int64_t now)
{
    ramp_end = now;
    srv_cpu_ramp_end = server_cpu();
    logmsg("connected %ld/%ld in %.3f s", n_connected, total, (double)(ramp_end - ramp_start) / 1e9);
    if (n_connected < total)
        g_exit_code = 3;
    if (n_connected == 0) {
        logmsg("no connection could be opened");
        finish(now);
        return;
    }
    if (o_mode == MODE_SOAK) {
        ready_mono = mono_ns();
        ready_real = real_ns();
        srv_rss_ready = server_rss();
        fprintf(stderr, "wsbench: ready connected=%ld mono_ns=%" PRId64 " realtime_ns=%" PRId64 "\n", n_connected,
                ready_mono, ready_real);
        g_publishing = 1;
        for (long i = o_subs; i < n_initial; i++) {
            conn *c = &conns[i];
            if (c->state == ST_OPEN) {
                c->last_echo = now;
                fill_window(c, now);
                flush_conn(c);
            }
        }
        phase = PH_SOAK;
        soak_start = now;
        soak_end = now + (int64_t)(o_duration * 1e9);
        next_churn = now + (int64_t)(o_churn_every_ms * 1e6);
        next_scan = now;
        start_measure(now);
        return;
    }
    if (o_mode == MODE_PUBLISH) {
        phase = PH_WARMUP;
        warm_end = now + (int64_t)(o_warmup * 1e9);
        g_publishing = 1;
        for (long i = o_subs; i < total; i++) {
            conn *c = &conns[i];
            if (c->state == ST_OPEN) {
                c->last_echo = now;
                fill_window(c, now);
                flush_conn(c);
            }
        }
        if (o_warmup <= 0) {
            phase = PH_MEASURE;
            start_measure(now);
        }
    } else {
        ready_mono = mono_ns();
        ready_real = real_ns();
        srv_rss_ready = server_rss();
        fprintf(stderr, "wsbench: ready connected=%ld mono_ns=%" PRId64 " realtime_ns=%" PRId64 "\n", n_connected,
                ready_mono, ready_real);
        phase = PH_HOLD;
        hold_end = now + (int64_t)(o_duration * 1e9);
        start_measure(now);
    }
}

static void housekeep(int64_t now)
{
    if (phase == PH_RAMP) {
        int64_t lim = (int64_t)(o_conn_timeout * 1e9);
        for (long i = 0; i < next_launch; i++) {
            conn *c = &conns[i];
            if ((c->state == ST_CONNECTING || c->state == ST_HANDSHAKE) && now - c->t_start > lim) {
                e_timeout++;
                conn_close(c);
            }
        }
        return;
    }
    if ((o_mode == MODE_SOAK || o_follow_upgrade) && pending) { /* churn replacements, moves */
        int64_t lim = (int64_t)(o_conn_timeout * 1e9);
        for (long i = n_initial; i < total; i++) {
            conn *c = &conns[i];
            if ((c->state == ST_CONNECTING || c->state == ST_HANDSHAKE) && now - c->t_start > lim) {
                e_timeout++;
                conn_close(c);
            }
        }
    }
    if (g_publishing && o_stall > 0) {
        int64_t lim = (int64_t)(o_stall * 1e9);
        for (long i = o_subs; i < n_initial; i++) {
            conn *c = &conns[i];
            if (c->state == ST_OPEN && c->inflight && !c->pub_stopped && !c->close_sent && now - c->last_echo > lim) {
                /* messages lost (dropped by the server?): refill the window */
                c_stalls++;
                c->inflight = 0;
                c->last_echo = now;
                fill_window(c, now);
                flush_conn(c);
            }
        }
    }
}

/* follow-upgrade: open the replacements that are due (make before break). */
static void start_moves(int64_t now)
{
    long base = total;
    for (long i = 0; i < base; i++) {
        if (!conns[i].t_move_due || now < conns[i].t_move_due || conns[i].state != ST_OPEN)
            continue;
        conns[i].t_move_due = 0;
        grow_slots(1); /* may move conns[]: no pointer is held across it */
        conn *fresh = &conns[total - 1];
        fresh->move_from = i + 1;
        c_moves_started++;
        launch(fresh, now);
    }
}

static void tick(int64_t now)
{
    if (g_signals && o_mode == MODE_SOAK) {
        g_signals = 0;
        if (g_sig_closing) {
            logmsg("signal: closing every connection now");
            finish_soak(now);
            return;
        }
        g_sig_closing = 1;
        logmsg("signal: closing every connection");
        soak_enter_drain(now, 0);
        return;
    }
    if (g_signals) {
        if (phase == PH_CLOSING) {
            phase = PH_EXIT;
            return;
        }
        g_signals = 0;
        logmsg("signal: stopping");
        finish(now);
        return;
    }
    if (now - last_housekeep >= HOUSEKEEP_NS) {
        last_housekeep = now;
        housekeep(now);
    }
    switch (phase) {
    case PH_RAMP:
        while (next_launch < total && pending < o_max_pending) {
            if (o_rate > 0 && (double)next_launch >= o_rate * (double)(now - ramp_start) / 1e9 + 1)
                break;
            launch(&conns[next_launch++], now);
        }
        if (n_done == total)
            ramp_done(now);
        break;
    case PH_SOAK:
    case PH_SETTLE:
    case PH_AWAIT:
    case PH_DRAIN:
        soak_tick(now);
        break;
    case PH_WARMUP:
        if (now >= warm_end) {
            phase = PH_MEASURE;
            start_measure(now);
        }
        break;
    case PH_MEASURE:
        if (now >= meas_start + (int64_t)(o_duration * 1e9))
            finish(now);
        break;
    case PH_HOLD:
        if (o_follow_upgrade && now >= next_move_scan) {
            next_move_scan = now + 5000000LL;
            start_moves(now);
        }
        if (now >= hold_end || (o_mode == MODE_EXPECT_CLOSE && n_open == 0))
            finish(now);
        break;
    case PH_CLOSING:
        if (n_open == 0 || now >= close_deadline) {
            for (long i = 0; i < total; i++)
                conn_close(&conns[i]);
            phase = PH_EXIT;
        }
        break;
    default:
        break;
    }
}

static int next_timeout_ms(int64_t now)
{
    int64_t dl = now + HOUSEKEEP_NS;
    switch (phase) {
    case PH_RAMP:
        if (o_rate > 0 && next_launch < total && pending < o_max_pending) {
            int64_t t = ramp_start + (int64_t)((double)next_launch / o_rate * 1e9);
            if (t < dl)
                dl = t;
        }
        break;
    case PH_WARMUP:
        if (warm_end < dl)
            dl = warm_end;
        break;
    case PH_MEASURE: {
        int64_t t = meas_start + (int64_t)(o_duration * 1e9);
        if (t < dl)
            dl = t;
        break;
    }
    case PH_HOLD:
        if (hold_end < dl)
            dl = hold_end;
        if (o_follow_upgrade && next_move_scan < dl)
            dl = next_move_scan;
        break;
    case PH_CLOSING:
        if (close_deadline < dl)
            dl = close_deadline;
        break;
    case PH_SOAK:
        if (o_churn > 0 && o_churn_every_ms > 0 && next_churn < dl)
            dl = next_churn;
        if (soak_end < dl)
            dl = soak_end;
        /* fall through */
    case PH_SETTLE:
    case PH_AWAIT:
    case PH_DRAIN:
        if (next_scan < dl)
            dl = next_scan;
        break;
    default:
        break;
    }
    int64_t ms = (dl - now + 999999) / 1000000;
    return ms < 0 ? 0 : (int)ms;
}

/* ---- setup ---- */
static void on_signal(int sig)
{
    (void)sig;
    if (g_signals >= 2)
        _exit(130);
    g_signals++;
}

static void usage(FILE *f)
{
    fputs("usage: wsbench [options]\n"
          "  --host H              server address (default 127.0.0.1)\n"
          "  --port N              server port (default 8000)\n"
          "  --path P              request path (default /ws)\n"
          "  --origin O            send this Origin header\n"
          "  --subscribers N       connections that only read (default 1000)\n"
          "  --publishers P        connections that also send (default 1); total = N + P\n"
          "  --window W            messages each publisher keeps in flight (default 1)\n"
          "  --size B              payload bytes per message (default 100, min 48)\n"
          "  --duration S          measured seconds (default 10)\n"
          "  --warmup S            seconds of load before measuring (default 1)\n"
          "  --connect-rate R      max new connections per second (default unlimited)\n"
          "  --max-pending K       max handshakes outstanding (default 200)\n"
          "  --connect-timeout S   per-connection connect+handshake timeout (default 10)\n"
          "  --stall-timeout S     refill a publisher window after S s without an echo (default 5, 0 off)\n"
          "  --close-timeout S     wait for the server's close replies at exit (default 2)\n"
          "  --idle                connect, print ready, hold for --duration (no publishing)\n"
          "  --expect-close        connect, print ready, time shutdown frames and closes\n"
          "  --soak                load + churn + ordering checks, then follow the server's drain:\n"
          "                        close each connection --linger-ms after its shutdown frame\n"
          "  --churn K             soak: subscribers closed and replaced per round (default 10, 0 off)\n"
          "  --churn-every MS      soak: milliseconds between churn rounds (default 250)\n"
          "  --linger-ms MS        soak: stay this long after the shutdown frame, then close (default 500)\n"
          "  --shutdown-wait S     soak: how long to wait for shutdown frames (default 10)\n"
          "  --seed N              soak: random seed for churn (default: from the clock)\n"
          "  --source A[,B..]      bind each connection to one of these IPv4 source addresses, in turn\n"
          "                        (127.0.0.2, 127.0.0.3, ...: one ephemeral port range each)\n"
          "  --follow-upgrade      expect-close: on an \"upgrade\" shutdown frame, open a new connection\n"
          "                        after its reconnect_after_ms, then close the old one (make before break)\n"
          "  --channels K          ebbcast channels: subscriber i subscribes to channel c<i mod K>,\n"
          "                        publisher j to c<j>, c<j+P>, ... and publishes to them in turn\n"
          "  --server-pid PID[,..] also report these processes' CPU and RSS\n"
          "  --json                print one JSON object on stdout\n"
          "  --quiet               fewer messages on stderr\n",
          f);
}

static double parse_num(const char *name, const char *s, double lo, double hi)
{
    char *e;
    errno = 0;
    double v = strtod(s, &e);
    if (errno || e == s || *e || v < lo || v > hi) {
        fprintf(stderr, "wsbench: invalid --%s '%s' (allowed %g..%g)\n", name, s, lo, hi);
        exit(2);
    }
    return v;
}

static void parse_args(int argc, char **argv)
{
    enum {
        OPT_HOST = 256, OPT_PORT, OPT_PATH, OPT_ORIGIN, OPT_SUBS, OPT_PUBS, OPT_WINDOW, OPT_SIZE, OPT_DURATION, OPT_WARMUP, OPT_RATE,
        OPT_PENDING, OPT_POLL, OPT_CTIMEOUT, OPT_STALL, OPT_CLOSE_TIMEOUT, OPT_IDLE, OPT_EXPECT, OPT_JSON, OPT_QUIET, OPT_SPID, OPT_HELP,
        OPT_SOAK, OPT_CHURN, OPT_CHURN_EVERY, OPT_LINGER, OPT_SD_WAIT, OPT_SEED,
        OPT_SOURCE, OPT_FOLLOW, OPT_CHANNELS
    };
    static const struct option opts[] = {
        {"host", required_argument, 0, OPT_HOST},
        {"port", required_argument, 0, OPT_PORT},
        {"path", required_argument, 0, OPT_PATH},
        {"origin", required_argument, 0, OPT_ORIGIN},
        {"subscribers", required_argument, 0, OPT_SUBS},
        {"publishers", required_argument, 0, OPT_PUBS},
        {"window", required_argument, 0, OPT_WINDOW},
        {"size", required_argument, 0, OPT_SIZE},
        {"duration", required_argument, 0, OPT_DURATION},
        {"warmup", required_argument, 0, OPT_WARMUP},
        {"connect-rate", required_argument, 0, OPT_RATE},
        {"max-pending", required_argument, 0, OPT_PENDING},
        {"poll-us", required_argument, 0, OPT_POLL},
        {"connect-timeout", required_argument, 0, OPT_CTIMEOUT},
        {"stall-timeout", required_argument, 0, OPT_STALL},
        {"close-timeout", required_argument, 0, OPT_CLOSE_TIMEOUT},
        {"idle", no_argument, 0, OPT_IDLE},
        {"expect-close", no_argument, 0, OPT_EXPECT},
        {"soak", no_argument, 0, OPT_SOAK},
        {"churn", required_argument, 0, OPT_CHURN},
        {"churn-every", required_argument, 0, OPT_CHURN_EVERY},
        {"linger-ms", required_argument, 0, OPT_LINGER},
        {"shutdown-wait", required_argument, 0, OPT_SD_WAIT},
        {"seed", required_argument, 0, OPT_SEED},
        {"source", required_argument, 0, OPT_SOURCE},
        {"follow-upgrade", no_argument, 0, OPT_FOLLOW},
        {"channels", required_argument, 0, OPT_CHANNELS},
        {"json", no_argument, 0, OPT_JSON},
        {"quiet", no_argument, 0, OPT_QUIET},
        {"server-pid", required_argument, 0, OPT_SPID},
        {"help", no_argument, 0, OPT_HELP},
        {0, 0, 0, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_HOST: o_host = optarg; break;
        case OPT_PORT: o_port = (int)parse_num("port", optarg, 1, 65535); break;
        case OPT_PATH: o_path = optarg; break;
        case OPT_ORIGIN: o_origin = optarg; break;
        case OPT_SUBS: o_subs = (long)parse_num("subscribers", optarg, 0, 1e7); break;
        case OPT_PUBS:
            o_pubs = (long)parse_num("publishers", optarg, 0, 1e6);
            o_pubs_set = 1;
            break;
        case OPT_WINDOW: o_window = (long)parse_num("window", optarg, 1, 1e6); break;
        case OPT_SIZE: o_size = (long)parse_num("size", optarg, MIN_SIZE, 64 << 20); break;
        case OPT_DURATION: o_duration = parse_num("duration", optarg, 0, 1e7); break;
        case OPT_WARMUP: o_warmup = parse_num("warmup", optarg, 0, 1e7); break;
        case OPT_RATE: o_rate = parse_num("connect-rate", optarg, 0, 1e9); break;
        case OPT_PENDING: o_max_pending = (long)parse_num("max-pending", optarg, 1, 1e7); break;
        case OPT_POLL: o_poll_us = parse_num("poll-us", optarg, 0, 1e6); break;
        case OPT_CTIMEOUT: o_conn_timeout = parse_num("connect-timeout", optarg, 0.001, 1e7); break;
        case OPT_STALL: o_stall = parse_num("stall-timeout", optarg, 0, 1e7); break;
        case OPT_CLOSE_TIMEOUT: o_close_timeout = parse_num("close-timeout", optarg, 0, 1e7); break;
        case OPT_IDLE: o_mode = MODE_IDLE; break;
        case OPT_EXPECT: o_mode = MODE_EXPECT_CLOSE; break;
        case OPT_SOAK: o_mode = MODE_SOAK; break;
        case OPT_CHURN: o_churn = (long)parse_num("churn", optarg, 0, 1e6); break;
        case OPT_CHURN_EVERY: o_churn_every_ms = parse_num("churn-every", optarg, 0, 1e9); break;
        case OPT_LINGER: o_linger_ms = parse_num("linger-ms", optarg, 0, 1e9); break;
        case OPT_SD_WAIT: o_shutdown_wait = parse_num("shutdown-wait", optarg, 0, 1e7); break;
        case OPT_SEED:
            o_seed = (uint64_t)parse_num("seed", optarg, 1, 9007199254740992.0);
            o_seed_set = 1;
            break;
        case OPT_JSON: o_json = 1; break;
        case OPT_FOLLOW: o_follow_upgrade = 1; break;
        case OPT_CHANNELS: o_channels = (long)parse_num("channels", optarg, 1, 1000000); break;
        case OPT_SOURCE: {
            char *list = strdup(optarg), *save = NULL;
            for (char *a = strtok_r(list, ",", &save); a; a = strtok_r(NULL, ",", &save)) {
                if (g_nsources == (int)(sizeof g_sources / sizeof *g_sources) ||
                    inet_pton(AF_INET, a, &g_sources[g_nsources].sin_addr) != 1) {
                    fprintf(stderr, "wsbench: invalid --source '%s' (IPv4 addresses, at most 64)\n", a);
                    exit(2);
                }
                g_sources[g_nsources++].sin_family = AF_INET;
            }
            free(list);
            break;
        }
        case OPT_QUIET: o_quiet = 1; break;
        case OPT_SPID: o_server_pids = optarg; break;
        case 'h':
        case OPT_HELP: usage(stdout); exit(0);
        default: usage(stderr); exit(2);
        }
    }
    if (optind < argc) {
        fprintf(stderr, "wsbench: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        exit(2);
    }
    if (o_channels && (o_mode != MODE_PUBLISH || o_pubs > o_channels)) {
        fprintf(stderr, "wsbench: --channels needs the publish mode and a channel per publisher\n");
        exit(2);
    }
    if (o_follow_upgrade && o_mode != MODE_EXPECT_CLOSE) {
        fprintf(stderr, "wsbench: --follow-upgrade needs --expect-close\n");
        exit(2);
    }
    if (o_mode != MODE_PUBLISH && o_mode != MODE_SOAK && !o_pubs_set)
        o_pubs = 0; /* idle / expect-close: only the subscribers, unless asked */
    total = o_subs + o_pubs;
    if (total < 1) {
        fprintf(stderr, "wsbench: need at least one connection\n");
        exit(2);
    }
}

static void raise_nofile(void)
{
    struct rlimit rl;
    rlim_t need = (rlim_t)total + 64;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
        die("getrlimit: %s", strerror(errno));
    if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < need) {
        /* root (CAP_SYS_RESOURCE) may raise the hard limit too */
        struct rlimit r2 = {need, need};
        if (setrlimit(RLIMIT_NOFILE, &r2) == 0)
            return;
        die("%ld connections need %lu file descriptors but the hard limit (ulimit -Hn) is %lu", total,
            (unsigned long)need, (unsigned long)rl.rlim_max);
    }
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
        die("setrlimit(RLIMIT_NOFILE, %lu): %s", (unsigned long)rl.rlim_max, strerror(errno));
}

static void resolve(void)
{
    struct addrinfo hints, *res;
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    char port[16];
    snprintf(port, sizeof port, "%d", o_port);
    int r = getaddrinfo(o_host, port, &hints, &res);
    if (r)
        die("cannot resolve %s: %s", o_host, gai_strerror(r));
    memcpy(&g_addr, res->ai_addr, res->ai_addrlen);
    g_addrlen = res->ai_addrlen;
    freeaddrinfo(res);
    int v6 = strchr(o_host, ':') != NULL;
    int n = snprintf(g_req, sizeof g_req,
                     "GET %s HTTP/1.1\r\nHost: %s%s%s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: " WS_KEY "\r\nSec-WebSocket-Version: 13\r\n%s%s%s\r\n",
                     o_path, v6 ? "[" : "", o_host, v6 ? "]" : "", o_port, o_origin ? "Origin: " : "",
                     o_origin ? o_origin : "", o_origin ? "\r\n" : "");
    if (n < 0 || (size_t)n >= sizeof g_req)
        die("request line too long");
    g_reqlen = (size_t)n;
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    raise_nofile();
    resolve();

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);
    sa.sa_handler = on_signal; /* no SA_RESTART: epoll_wait returns EINTR */
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    n_initial = total;
    total = 0;
    grow_slots(n_initial);
    g_shared = malloc(SMALL_MAX + READ_SZ + 16);
    if (!g_shared)
        die("out of memory");
    if (!o_seed_set)
        o_seed = ((uint64_t)mono_ns() ^ ((uint64_t)getpid() << 32)) | 1;
    g_rng = o_seed;
    for (long i = 0; i < total; i++) {
        if (i >= o_subs) {
            conns[i].is_pub = 1;
            conns[i].pubid = (uint32_t)(i - o_subs);
        }
    }
    build_template();
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die("epoll_create1: %s", strerror(errno));

    struct epoll_event evs[MAX_EVENTS];
    int64_t poll_ns = (int64_t)(o_poll_us * 1e3);
    ramp_start = last_housekeep = mono_ns();
    srv_cpu_ramp_start = server_cpu();
    logmsg("connecting %ld connections to %s:%d%s", total, o_host, o_port, o_path);
    while (phase != PH_EXIT) {
        int64_t now = mono_ns();
        tick(now);
        if (phase == PH_EXIT)
            break;
        int64_t wait_start = mono_ns();
        int n = epoll_wait(ep, evs, MAX_EVENTS, next_timeout_ms(wait_start));
        c_epoll_waits++;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait: %s", strerror(errno));
        }
        c_events += (uint64_t)n;
        for (int i = 0; i < n; i++)
            on_event(&conns[evs[i].data.u64], evs[i].events);
        if (poll_ns && n > 0 && n < MAX_EVENTS && phase != PH_RAMP) {
            /* batch: let frames pile up instead of waking for each one */
            int64_t until = wait_start + poll_ns;
            struct timespec ts = {(time_t)(until / 1000000000LL), (long)(until % 1000000000LL)};
            if (until > mono_ns())
                clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
        }
    }
    if (n_connected == 0)
        g_exit_code = 1;
    return g_exit_code;
}
