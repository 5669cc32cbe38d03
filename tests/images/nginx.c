/* A stand-in for nginx as registry.k8s.io/e2e-test-images/nginx runs it ("nginx -g 'daemon off;'"), for critest.
 *
 * What critest relies on, and real nginx does: a process named `nginx` whose command line reads
 * "nginx: master process ...", its pid in /var/run/nginx.pid, HTTP 200 on the port. The master binds the port
 * and forks a worker that serves it; the worker keeps the master's stdout and stderr (its access log goes to
 * stdout) and outlives a SIGKILLed master, as nginx's workers do, which is what a runtime's stop has to cope with.
 * SIGTERM/SIGINT/SIGQUIT make the master stop the worker and exit. Port: $NGINX_PORT, default 80. */
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static const char master_title[] = "nginx: master process nginx -g daemon off;";
static const char worker_title[] = "nginx: worker process";
static const char page[] = "<!DOCTYPE html>\n<html><head><title>Welcome to nginx!</title></head>"
                           "<body><h1>Welcome to nginx!</h1></body></html>\n";

static volatile sig_atomic_t stopping;

static void on_stop(int sig) { (void)sig; stopping = 1; }

/* Rewrites the command line in place, as nginx does (ngx_setproctitle). */
static void set_title(char **argv, const char *title) {
    size_t room = strlen(argv[0]) + 1;
    memset(argv[0], 0, room);
    strncpy(argv[0], title, room - 1);
}

static void serve(int lsock) {
    for (;;) {
        int c = accept(lsock, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR) continue;
            perror("nginx: accept");
            exit(1);
        }
        char req[4096];
        size_t got = 0;
        while (got < sizeof req - 1) {
            ssize_t n = read(c, req + got, sizeof req - 1 - got);
            if (n <= 0) break;
            got += (size_t)n;
            req[got] = 0;
            if (strstr(req, "\r\n\r\n")) break;
        }
        req[got] = 0;
        char *eol = strstr(req, "\r\n");
        if (eol) *eol = 0;
        char head[256];
        int hl = snprintf(head, sizeof head,
                          "HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/html\r\n"
                          "Content-Length: %zu\r\nConnection: close\r\n\r\n",
                          sizeof page - 1);
        if (write(c, head, (size_t)hl) < 0 || write(c, page, sizeof page - 1) < 0) perror("nginx: write");
        close(c);
        printf("\"%s\" 200 %zu\n", req, sizeof page - 1);
        fflush(stdout);
    }
}

int main(int argc, char **argv) {
    (void)argc;
    /* The title must fit in argv[0]'s own bytes: start again with it as argv[0] (the name stays `nginx`). */
    if (strcmp(argv[0], master_title) != 0) {
        char self[4096];
        ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
        if (n < 0) { perror("nginx: readlink /proc/self/exe"); return 1; }
        self[n] = 0;
        char *args[] = {(char *)master_title, NULL};
        execv(self, args);
        perror("nginx: execv");
        return 1;
    }
    const char *p = getenv("NGINX_PORT");
    int port = p ? atoi(p) : 80;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (s < 0 || bind(s, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(s, 64) < 0) {
        perror("nginx: listen");
        return 1;
    }
    FILE *pidf = fopen("/var/run/nginx.pid", "w");
    if (pidf) {
        fprintf(pidf, "%d\n", getpid());
        fclose(pidf);
    }
    pid_t worker = fork();
    if (worker < 0) { perror("nginx: fork"); return 1; }
    if (worker == 0) {
        set_title(argv, worker_title);
        serve(s);
    }
    struct sigaction sa = {.sa_handler = on_stop};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGQUIT, &sa, NULL);
    for (;;) {
        int st;
        pid_t r = waitpid(-1, &st, 0);
        if (stopping) break;
        if (r == worker) { fprintf(stderr, "nginx: worker process %d exited\n", worker); return 1; }
    }
    kill(worker, SIGTERM);
    waitpid(worker, NULL, 0);
    unlink("/var/run/nginx.pid");
    return 0;
}
