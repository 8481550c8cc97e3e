/*
 * sendfloor: what the kernel alone charges for a fan-out's sends on this machine.
 *
 * Opens N loopback TCP connections (TCP_NODELAY, as the daemon sets them), forks a
 * reader that drains their far ends with epoll (as a load generator does), and
 * sends one BYTES-byte buffer per send() to the connections in turn, TOTAL times.
 * Prints one JSON object: the sender's CPU (user + system) per send. No server
 * written in any language can deliver one frame per send() for less on this
 * machine; the bench reads a server's sends per CPU-second against this.
 *
 * Usage: sendfloor [--connections N] [--sends TOTAL] [--bytes BYTES]
 * (C11, libc only; file descriptors: 2N + a few, so N <= 9,900 under a 20,000 limit).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double cpu_seconds(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return (double)(r.ru_utime.tv_sec + r.ru_stime.tv_sec) +
           (double)(r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e6;
}

static double wall_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

/* The reader: drain every connection until the sender closes them all. */
static void drain(const int *fds, int n) {
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    for (int i = 0; i < n; i++) {
        struct epoll_event e = {.events = EPOLLIN, .data.fd = fds[i]};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &e) < 0) die("epoll_ctl");
    }
    static char buf[1 << 16];
    struct epoll_event events[512];
    int open = n;
    while (open > 0) {
        int k = epoll_wait(ep, events, 512, -1);
        for (int j = 0; j < k; j++) {
            ssize_t got = read(events[j].data.fd, buf, sizeof buf);
            if (got <= 0) {
                epoll_ctl(ep, EPOLL_CTL_DEL, events[j].data.fd, NULL);
                close(events[j].data.fd);
                open--;
            }
        }
    }
    exit(0);
}

int main(int argc, char **argv) {
    int n = 9000, size = 130;
    long total = 1000000;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--connections")) n = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--sends")) total = atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--bytes")) size = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "usage: sendfloor [--connections N] [--sends TOTAL] [--bytes B]\n");
            return 2;
        }
    }
    if (n < 1 || size < 1 || total < 1) {
        fprintf(stderr, "sendfloor: connections, sends and bytes must be positive\n");
        return 2;
    }
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof addr;
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0 ||
        listen(listener, 4096) < 0 || getsockname(listener, (struct sockaddr *)&addr, &len) < 0)
        die("listen");
    int *out = malloc(sizeof(int) * (size_t)n), *in = malloc(sizeof(int) * (size_t)n);
    if (!out || !in) die("malloc");
    for (int i = 0; i < n; i++) {
        in[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (in[i] < 0 || connect(in[i], (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
        out[i] = accept(listener, NULL, NULL);
        int one = 1;
        if (out[i] < 0 || setsockopt(out[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
            die("accept");
    }
    close(listener);
    pid_t reader = fork();
    if (reader < 0) die("fork");
    if (reader == 0) {
        for (int i = 0; i < n; i++) close(out[i]);
        drain(in, n);
    }
    for (int i = 0; i < n; i++) close(in[i]);
    char *frame = malloc((size_t)size);
    if (!frame) die("malloc");
    memset(frame, 'x', (size_t)size);
    double cpu0 = cpu_seconds(), wall0 = wall_seconds();
    for (long i = 0; i < total; i++)
        if (send(out[i % n], frame, (size_t)size, 0) != size) die("send");
    double cpu = cpu_seconds() - cpu0, wall = wall_seconds() - wall0;
    for (int i = 0; i < n; i++) close(out[i]);
    waitpid(reader, NULL, 0);
    printf("{\"connections\":%d,\"sends\":%ld,\"bytes\":%d,\"cpu_s\":%.3f,\"wall_s\":%.3f,"
           "\"sends_per_cpu_s\":%.0f,\"us_per_send\":%.2f}\n",
           n, total, size, cpu, wall, (double)total / cpu, cpu * 1e6 / (double)total);
    return 0;
}
