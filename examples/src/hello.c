/* hello: the smallest pod. Greets whoever argv names, says where it runs (from the downward API
 * env), and exits 0. */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    const char *pod = getenv("POD_NAME");
    const char *node = getenv("NODE_NAME");
    printf("Hello, %s! I am %s, a WebAssembly module in pod %s on node %s.\n",
           argc > 1 ? argv[1] : "world", argv[0], pod ? pod : "?", node ? node : "?");
    return 0;
}
