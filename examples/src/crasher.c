/* crasher: starts, complains and exits 1 after a moment, so the kubelet restarts it with a
 * growing back-off (CrashLoopBackOff). `crasher trap` dies on a wasm trap instead. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    printf("crasher: starting up\n");
    fflush(stdout);
    sleep(1);
    if (argc > 1 && !strcmp(argv[1], "trap")) {
        fprintf(stderr, "crasher: about to execute an unreachable instruction\n");
        __builtin_trap();
    }
    fprintf(stderr, "crasher: cannot find my configuration, giving up (exit 1)\n");
    return 1;
}
