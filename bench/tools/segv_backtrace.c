/* A SIGSEGV/SIGBUS/SIGABRT handler that prints the native stack (module, symbol, offset) to stderr, then lets the
 * signal kill the process as before. For a machine without gdb: bench/diagnose_aoti.py builds it with
 * `gcc -shared -fPIC -O0 -o segv_backtrace.so segv_backtrace.c -ldl` and calls `hysparse_install_backtrace()`
 * through ctypes just before the call that crashes. Offsets are from each module's load base, for
 * `addr2line -e MODULE OFFSET` or `nm -D --defined-only MODULE | sort` on the same files. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>
#include <unistd.h>

static void say(const char *text, int len) {
    if (len > 0) (void)!write(2, text, (size_t)len);
}

static void print_frame(int i, void *addr) {
    char line[768];
    Dl_info info;
    memset(&info, 0, sizeof info);
    int len;
    if (dladdr(addr, &info) && info.dli_fname) {
        len = snprintf(line, sizeof line, "native #%d %p %s +%#lx (%s +%#lx)\n", i, addr, info.dli_fname,
                       (unsigned long)((char *)addr - (char *)info.dli_fbase),
                       info.dli_sname ? info.dli_sname : "?",
                       info.dli_sname ? (unsigned long)((char *)addr - (char *)info.dli_saddr) : 0UL);
    } else {
        len = snprintf(line, sizeof line, "native #%d %p (no module)\n", i, addr);
    }
    say(line, len);
}

static void handler(int sig, siginfo_t *si, void *context) {
    char line[256];
    int len = snprintf(line, sizeof line, "native: signal %d (%s), fault address %p\n", sig, strsignal(sig),
                       si ? si->si_addr : NULL);
    say(line, len);
    ucontext_t *uc = (ucontext_t *)context;
    print_frame(-1, (void *)uc->uc_mcontext.gregs[REG_RIP]); /* the faulting instruction */
    void *frames[48];
    int n = backtrace(frames, 48);
    for (int i = 0; i < n; i++) print_frame(i, frames[i]);
    signal(sig, SIG_DFL);
    raise(sig);
}

void hysparse_install_backtrace(void) {
    static char stack[1 << 16];
    stack_t ss = {.ss_sp = stack, .ss_size = sizeof stack, .ss_flags = 0};
    sigaltstack(&ss, NULL);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGSEGV, &sa, NULL);
    sigaction(SIGBUS, &sa, NULL);
    sigaction(SIGABRT, &sa, NULL);
    sigaction(SIGILL, &sa, NULL);
}
