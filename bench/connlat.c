/*
 * connlat: the data-plane benchmark's load generator (bench/dataplane.py builds and runs it).
 *
 *   connlat COUNT IP PORT [IP PORT ...]   COUNT blocking connect()s, cycling through the
 *                                         targets; prints "TARGET_INDEX NANOSECONDS" (or
 *                                         "TARGET_INDEX -ERRNO") per connection
 *   connlat serve PORT                    accept() and close() forever (the backend)
 *
 * Why C: what is measured is one new TCP connection at a time (SYN out through the node's
 * nat table, SYN-ACK back), tens of microseconds; the clock is read right around the connect()
 * system call, so the figure holds the kernel's path and nothing of an interpreter (no
 * allocation, no GC, no per-call bytecode between the two clock reads). Each socket is closed
 * with SO_LINGER 0 (an RST: no TIME_WAIT, so COUNT can be large without exhausting ports).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int serve(int port) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    struct sockaddr_in a;
    if (s < 0) { perror("socket"); return 1; }
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)port);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 1; }
    if (listen(s, 4096) < 0) { perror("listen"); return 1; }
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c >= 0) close(c);
    }
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "serve") == 0) return serve(atoi(argv[2]));
    if (argc < 4 || argc % 2 != 0) {
        fprintf(stderr, "usage: connlat COUNT IP PORT [IP PORT ...] | connlat serve PORT\n");
        return 2;
    }
    int count = atoi(argv[1]);
    int n = (argc - 2) / 2;
    struct sockaddr_in *targets = calloc((size_t)n, sizeof *targets);
    if (targets == NULL) return 1;
    for (int k = 0; k < n; k++) {
        targets[k].sin_family = AF_INET;
        targets[k].sin_port = htons((unsigned short)atoi(argv[3 + 2 * k]));
        if (inet_pton(AF_INET, argv[2 + 2 * k], &targets[k].sin_addr) != 1) {
            fprintf(stderr, "bad address %s\n", argv[2 + 2 * k]);
            return 2;
        }
    }
    struct linger reset = {1, 0};
    struct timeval limit = {2, 0}; /* a connect that takes 2 s failed: counted, not timed */
    for (int i = 0; i < count; i++) {
        int k = i % n;
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0) { perror("socket"); return 1; }
        setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof limit);
        long long t0 = now_ns();
        int r = connect(s, (struct sockaddr *)&targets[k], sizeof targets[k]);
        long long t1 = now_ns();
        if (r == 0) printf("%d %lld\n", k, t1 - t0);
        else printf("%d -%d\n", k, errno);
        setsockopt(s, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
        close(s);
    }
    return 0;
}
