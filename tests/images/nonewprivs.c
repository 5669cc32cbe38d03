/* The entrypoint of registry.k8s.io/e2e-test-images/nonewprivs for critest's NoNewPrivs specs: installed set-uid
 * root, it prints the effective uid it runs with (0 unless no_new_privs kept the caller's). */
#include <stdio.h>
#include <unistd.h>

int main(void) {
    printf("Effective uid: %d\n", (int)geteuid());
    return 0;
}
