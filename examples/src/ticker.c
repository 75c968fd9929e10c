/* ticker: a long-running pod that logs one line every second, forever (or COUNT times). */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    long count = argc > 1 ? atol(argv[1]) : 0;   /* 0: forever */
    const char *pod = getenv("POD_NAME");
    setvbuf(stdout, NULL, _IOLBF, 0);            /* one log record per tick, not per buffer */
    for (long tick = 1; count == 0 || tick <= count; tick++) {
        printf("tick %ld from %s at %lld\n", tick, pod ? pod : "ticker", (long long)time(NULL));
        sleep(1);
    }
    return 0;
}
