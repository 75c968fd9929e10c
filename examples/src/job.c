/* job: a run-to-completion pod in two steps.
 *
 *   job prepare FILE WORD...                 write WORD... to FILE, one per line
 *   job greet GREETING_FILE NAMES_FILE OUT   write "<greeting>, <name>!" for every name to OUT,
 *                                            print each line, exit 0 (1 when an input is missing)
 *
 * WASI has no working directory: minikrust passes the container's workingDir as $PWD, and this
 * module honours it with chdir(), so relative paths (OUT) land in the working directory. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int fail(const char *what, const char *path) {
    fprintf(stderr, "job: %s %s: %s\n", what, path, strerror(errno));
    return 1;
}

static void chomp(char *s) { s[strcspn(s, "\r\n")] = 0; }

static int prepare(const char *path, int n, char **words) {
    FILE *out = fopen(path, "w");
    if (!out) return fail("cannot create", path);
    for (int i = 0; i < n; i++) fprintf(out, "%s\n", words[i]);
    if (fclose(out)) return fail("cannot write", path);
    printf("prepared %d names in %s\n", n, path);
    return 0;
}

static int greet(const char *greeting_path, const char *names_path, const char *out_path) {
    char greeting[256] = "Hello", name[256];
    FILE *g = fopen(greeting_path, "r");
    if (!g) return fail("cannot read the greeting", greeting_path);
    if (!fgets(greeting, sizeof greeting, g)) greeting[0] = 0;
    fclose(g);
    chomp(greeting);
    FILE *names = fopen(names_path, "r");
    if (!names) return fail("cannot read the names", names_path);
    FILE *out = fopen(out_path, "w");
    if (!out) return fail("cannot create", out_path);
    int count = 0;
    while (fgets(name, sizeof name, names)) {
        chomp(name);
        if (!name[0]) continue;
        fprintf(out, "%s, %s!\n", greeting, name);
        printf("%s, %s!\n", greeting, name);
        count++;
    }
    fclose(names);
    if (fclose(out)) return fail("cannot write", out_path);
    printf("wrote %d greetings to %s\n", count, out_path);
    return 0;
}

int main(int argc, char **argv) {
    const char *pwd = getenv("PWD");
    if (pwd && chdir(pwd) != 0) return fail("cannot enter the working directory", pwd);
    if (argc >= 3 && !strcmp(argv[1], "prepare")) return prepare(argv[2], argc - 3, argv + 3);
    if (argc == 5 && !strcmp(argv[1], "greet")) return greet(argv[2], argv[3], argv[4]);
    fprintf(stderr, "usage: job prepare FILE WORD... | job greet GREETING_FILE NAMES_FILE OUT\n");
    return 64;
}
