"""Build the compiled Xen bindings: ``python -m dispoold.xen.build``.

cffi in API mode: the declarations below are checked by the C compiler against the
installed ``libxl.h`` / ``xenstore.h`` / ``libxlutil.h`` (Debian: ``libxen-dev``; Fedora
and Qubes dom0: ``xen-devel``), so a signature that differs in the installed Xen fails
the build instead of corrupting the stack at run time. The result is one extension
module, :mod:`dispoold.xen._xenlight`, written next to this file (or to
``--output-dir``). Without it, dispoold still installs and runs its other backends; the
Xen backend then refuses to load and says how to build this (see
:mod:`dispoold.xen.bindings`).

``LIBXL_API_VERSION`` pins the libxl API we were written against: 0x041400, the newest
that Xen 4.17's ``libxl.h`` accepts. With it, pause/unpause/destroy take the
``ao_how`` argument (4.13+), and the memory calls use 64-bit KiB values (4.8+).
``DISPOOLD_LIBXL_API_VERSION`` overrides it for a libxl that no longer accepts it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from cffi import FFI  # type: ignore[import-untyped]  # no stubs in the dev deps

MODULE = "dispoold.xen._xenlight"
API_VERSION = os.environ.get("DISPOOLD_LIBXL_API_VERSION", "0x041400")
HEADERS = ("libxl.h", "libxl_utils.h", "libxlutil.h", "xenstore.h", "xentoollog.h")
LIBRARIES = ["xenlight", "xlutil", "xenstore", "xentoollog"]

# Everything Python calls. Structs end in "...;": cffi takes their layout from the real
# headers, so only the fields we touch are named here.
CDEF = """
/* --- libc: libxl frees what it is given with free() --- */
void *calloc(size_t nmemb, size_t size);
void free(void *ptr);
char *strdup(const char *s);

/* --- libxl types --- */
typedef struct libxl__ctx libxl_ctx;
typedef struct xentoollog_logger xentoollog_logger;
typedef uint32_t libxl_domid;
typedef int... libxl_domain_type;
typedef int... libxl_shutdown_reason;
typedef int... libxl_error;
typedef char **libxl_key_value_list;
typedef struct { ...; } libxl_uuid;
typedef struct { ...; } libxl_bitmap;
typedef struct { ...; } libxl_asyncop_how;
typedef struct { ...; } libxl_asyncprogress_how;
typedef struct { ...; } libxl_device_disk;
typedef uint8_t libxl_mac[6];
typedef int libxl_devid;
typedef struct libxl_device_nic {
    libxl_domid backend_domid;
    char *backend_domname;
    libxl_devid devid;
    libxl_mac mac;
    char *bridge;
    ...;
} libxl_device_nic;

typedef struct libxl_dominfo {
    libxl_uuid uuid;
    libxl_domid domid;
    bool running;
    bool blocked;
    bool paused;
    bool shutdown;
    bool dying;
    libxl_shutdown_reason shutdown_reason;
    uint64_t current_memkb;
    uint64_t max_memkb;
    ...;
} libxl_dominfo;

typedef struct libxl_domain_create_info {
    libxl_domain_type type;
    char *name;
    libxl_uuid uuid;
    libxl_key_value_list xsdata;
    ...;
} libxl_domain_create_info;

typedef struct libxl_domain_build_info {
    int max_vcpus;
    libxl_bitmap avail_vcpus;
    uint64_t max_memkb;
    uint64_t target_memkb;
    char *kernel;
    char *cmdline;
    char *ramdisk;
    ...;
} libxl_domain_build_info;

typedef struct libxl_domain_config {
    libxl_domain_create_info c_info;
    libxl_domain_build_info b_info;
    int num_disks;
    libxl_device_disk *disks;
    int num_nics;
    libxl_device_nic *nics;
    ...;
} libxl_domain_config;

#define LIBXL_VERSION ...
#define LIBXL_DOMAIN_TYPE_PV ...
#define LIBXL_DOMAIN_TYPE_PVH ...
#define ERROR_FAIL ...
#define ERROR_INVAL ...
#define ERROR_DOMAIN_NOTFOUND ...
#define ERROR_NOTFOUND ...

/* --- libxl functions (4.17 signatures, LIBXL_API_VERSION 0x041400) --- */
int libxl_ctx_alloc(libxl_ctx **pctx, int version, unsigned flags, xentoollog_logger *lg);
int libxl_ctx_free(libxl_ctx *ctx);
const char *libxl_error_to_string(libxl_error p);

void libxl_domain_config_init(libxl_domain_config *d_config);
void libxl_domain_config_dispose(libxl_domain_config *d_config);
void libxl_domain_build_info_init_type(libxl_domain_build_info *p, libxl_domain_type type);
void libxl_device_disk_init(libxl_device_disk *p);
void libxl_device_disk_dispose(libxl_device_disk *p);
void libxl_device_nic_init(libxl_device_nic *p);
int libxl_bitmap_alloc(libxl_ctx *ctx, libxl_bitmap *bitmap, int n_bits);
void libxl_bitmap_set(libxl_bitmap *bitmap, int bit);
void libxl_uuid_generate(libxl_uuid *uuid);
uint8_t *libxl_uuid_bytearray(libxl_uuid *uuid);

int libxl_domain_create_new(libxl_ctx *ctx, libxl_domain_config *d_config, uint32_t *domid,
                            const libxl_asyncop_how *ao_how,
                            const libxl_asyncprogress_how *aop_console_how);
typedef struct libxl_domain_restore_params {
    int checkpointed_stream;
    uint32_t stream_version;
    ...;
} libxl_domain_restore_params;
void libxl_domain_restore_params_init(libxl_domain_restore_params *p);
void libxl_domain_restore_params_dispose(libxl_domain_restore_params *p);
int libxl_domain_create_restore(libxl_ctx *ctx, libxl_domain_config *d_config,
                                uint32_t *domid, int restore_fd, int send_back_fd,
                                const libxl_domain_restore_params *params,
                                const libxl_asyncop_how *ao_how,
                                const libxl_asyncprogress_how *aop_console_how);
int libxl_domain_suspend(libxl_ctx *ctx, uint32_t domid, int fd, int flags,
                         const libxl_asyncop_how *ao_how);
int libxl_domain_rename(libxl_ctx *ctx, uint32_t domid, const char *old_name,
                        const char *new_name);
int libxl_domain_pause(libxl_ctx *ctx, uint32_t domid, const libxl_asyncop_how *ao_how);
int libxl_domain_unpause(libxl_ctx *ctx, uint32_t domid, const libxl_asyncop_how *ao_how);
int libxl_domain_destroy(libxl_ctx *ctx, uint32_t domid, const libxl_asyncop_how *ao_how);
int libxl_set_memory_target(libxl_ctx *ctx, uint32_t domid, int64_t target_memkb,
                            int relative, int enforce);
int libxl_get_free_memory(libxl_ctx *ctx, uint64_t *memkb);
typedef struct libxl_physinfo {
    bool cap_hvm;
    bool cap_pv;
    bool cap_hap;
    ...;
} libxl_physinfo;
void libxl_physinfo_init(libxl_physinfo *p);
void libxl_physinfo_dispose(libxl_physinfo *p);
int libxl_get_physinfo(libxl_ctx *ctx, libxl_physinfo *physinfo);
/* 1 when this libxl has the domain-fork API (LIBXL_HAVE_VM_FORK), else 0. */
int dispoold_have_vm_fork(void);

void libxl_dominfo_init(libxl_dominfo *p);
void libxl_dominfo_dispose(libxl_dominfo *p);
int libxl_domain_info(libxl_ctx *ctx, libxl_dominfo *info_r, uint32_t domid);
libxl_dominfo *libxl_list_domain(libxl_ctx *ctx, int *nb_domain_out);
void libxl_dominfo_list_free(libxl_dominfo *list, int nb_domain);
int libxl_name_to_domid(libxl_ctx *ctx, const char *name, uint32_t *domid);

/* --- xenstore --- */
struct xs_handle;
typedef uint32_t xs_transaction_t;
struct xs_permissions { unsigned int id; unsigned int perms; };
#define XBT_NULL ...
#define XS_PERM_NONE ...
#define XS_PERM_READ ...
#define XS_PERM_WRITE ...
#define XS_WATCH_PATH ...
#define XS_WATCH_TOKEN ...

struct xs_handle *xs_open(unsigned long flags);
void xs_close(struct xs_handle *xsh);
void *xs_read(struct xs_handle *h, xs_transaction_t t, const char *path, unsigned int *len);
bool xs_write(struct xs_handle *h, xs_transaction_t t, const char *path, const void *data,
              unsigned int len);
bool xs_rm(struct xs_handle *h, xs_transaction_t t, const char *path);
char **xs_directory(struct xs_handle *h, xs_transaction_t t, const char *path,
                    unsigned int *num);
struct xs_permissions *xs_get_permissions(struct xs_handle *h, xs_transaction_t t,
                                          const char *path, unsigned int *num);
bool xs_set_permissions(struct xs_handle *h, xs_transaction_t t, const char *path,
                        struct xs_permissions *perms, unsigned int num_perms);
bool xs_watch(struct xs_handle *h, const char *path, const char *token);
bool xs_unwatch(struct xs_handle *h, const char *path, const char *token);
int xs_fileno(struct xs_handle *h);
xs_transaction_t xs_transaction_start(struct xs_handle *h);
bool xs_transaction_end(struct xs_handle *h, xs_transaction_t t, bool abort);
char **xs_check_watch(struct xs_handle *h);

/* --- dispoold's C helpers (below) --- */
xentoollog_logger *dispoold_logger_new(int stderr_level);
void dispoold_logger_free(xentoollog_logger *logger);
const char *dispoold_last_error(void);
int dispoold_last_errno(void);
void dispoold_clear_error(void);
void dispoold_childproc_setmode(libxl_ctx *ctx, int mainloop);
void libxl_childproc_sigchld_occurred(libxl_ctx *ctx);
int dispoold_disk_parse(const char *spec, libxl_device_disk *disk, char *report,
                        size_t report_len);
"""

# C helpers compiled into the module: things Python cannot do through cffi (a logger
# receives a va_list; libxl keeps a pointer to the childproc hooks for the context's
# lifetime; xlu_disk_parse reports errors to a FILE).
SOURCE = """
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libxl.h>
#include <libxl_utils.h>
#include <libxlutil.h>
#include <xenstore.h>
#include <xentoollog.h>

/* The last error libxl logged on this thread: every libxl call runs on a worker thread
 * and reads it back when it fails, so that BackendError says what libxl said. */
static __thread char dispoold_errbuf[1024];
static __thread int dispoold_errno_val = -1;

struct dispoold_logger {
    xentoollog_logger vtable;
    xentoollog_logger *inner; /* a stdiostream logger on stderr, or NULL */
};

static void dispoold_vmessage(xentoollog_logger *logger, xentoollog_level level,
                              int errnoval, const char *context, const char *format,
                              va_list al)
{
    struct dispoold_logger *self = (struct dispoold_logger *)logger;
    if (level >= XTL_ERROR) {
        va_list copy;
        va_copy(copy, al);
        vsnprintf(dispoold_errbuf, sizeof(dispoold_errbuf), format, copy);
        va_end(copy);
        dispoold_errno_val = errnoval;
    }
    if (self->inner)
        self->inner->vmessage(self->inner, level, errnoval, context, format, al);
}

static void dispoold_progress(xentoollog_logger *logger, const char *context,
                              const char *doing_what, int percent, unsigned long done,
                              unsigned long total)
{
    (void)logger; (void)context; (void)doing_what; (void)percent; (void)done; (void)total;
}

static void dispoold_destroy(xentoollog_logger *logger)
{
    struct dispoold_logger *self = (struct dispoold_logger *)logger;
    if (self->inner)
        xtl_logger_destroy(self->inner);
    free(self);
}

xentoollog_logger *dispoold_logger_new(int stderr_level)
{
    struct dispoold_logger *self = calloc(1, sizeof(*self));
    if (!self)
        return NULL;
    self->vtable.vmessage = dispoold_vmessage;
    self->vtable.progress = dispoold_progress;
    self->vtable.destroy = dispoold_destroy;
    if (stderr_level > XTL_NONE && stderr_level < XTL_NUM_LEVELS)
        self->inner = (xentoollog_logger *)xtl_createlogger_stdiostream(
            stderr, (xentoollog_level)stderr_level, XTL_STDIOSTREAM_HIDE_PROGRESS);
    return &self->vtable;
}

void dispoold_logger_free(xentoollog_logger *logger)
{
    xtl_logger_destroy(logger);
}

const char *dispoold_last_error(void) { return dispoold_errbuf; }
int dispoold_last_errno(void) { return dispoold_errno_val; }
void dispoold_clear_error(void) { dispoold_errbuf[0] = 0; dispoold_errno_val = -1; }

/* libxl keeps these pointers for the context's lifetime: statics outlive it.
 * Which one and why: see dispoold/xen/libxl.py. */
static const libxl_childproc_hooks dispoold_hooks_mainloop = {
    .chldowner = libxl_sigchld_owner_mainloop,
};
static const libxl_childproc_hooks dispoold_hooks_selective_reap = {
    .chldowner = libxl_sigchld_owner_libxl_always_selective_reap,
};

int dispoold_have_vm_fork(void)
{
#ifdef LIBXL_HAVE_VM_FORK
    return 1;
#else
    return 0;
#endif
}

void dispoold_childproc_setmode(libxl_ctx *ctx, int mainloop)
{
    libxl_childproc_setmode(
        ctx, mainloop ? &dispoold_hooks_mainloop : &dispoold_hooks_selective_reap, NULL);
}

/* xl's own parser for xl's disk syntax; its complaints land in report. */
int dispoold_disk_parse(const char *spec, libxl_device_disk *disk, char *report,
                        size_t report_len)
{
    char *text = NULL;
    size_t text_len = 0;
    XLU_Config *cfg;
    FILE *out;
    int rc;

    if (report_len)
        report[0] = 0;
    out = open_memstream(&text, &text_len);
    if (!out)
        return errno ? errno : ENOMEM;
    cfg = xlu_cfg_init(out, "disk specification");
    if (!cfg) {
        fclose(out);
        free(text);
        return ENOMEM;
    }
    rc = xlu_disk_parse(cfg, 1, &spec, disk);
    xlu_cfg_destroy(cfg);
    fclose(out);
    if (report_len && text)
        snprintf(report, report_len, "%s", text);
    free(text);
    return rc;
}
"""


def make_ffi() -> FFI:
    ffibuilder = FFI()
    ffibuilder.cdef(CDEF)
    ffibuilder.set_source(
        MODULE,
        SOURCE,
        libraries=LIBRARIES,
        define_macros=[("LIBXL_API_VERSION", API_VERSION)],
        extra_compile_args=["-Wall", "-Wno-unused-function"],
    )
    return ffibuilder


#: For a setuptools ``cffi_modules = ["dispoold/xen/build.py:ffibuilder"]`` entry.
ffibuilder = make_ffi()


def include_dirs() -> list[Path]:
    """Where the compiler will look for the headers (the common places plus $CPATH)."""
    dirs = [Path(p) for p in os.environ.get("CPATH", "").split(":") if p]
    dirs += [Path(p) for p in os.environ.get("C_INCLUDE_PATH", "").split(":") if p]
    dirs += [Path("/usr/local/include"), Path("/usr/include")]
    return dirs


def missing_headers() -> list[str]:
    return [h for h in HEADERS if not any((d / h).is_file() for d in include_dirs())]


def build(output_dir: Path, *, verbose: bool = False) -> Path:
    """Compile the module into ``output_dir``; returns the path of the built file.

    Raises SystemExit with an explanation when the headers are missing.
    """
    missing = missing_headers()
    if missing:
        raise SystemExit(
            f"cannot build the Xen bindings: {', '.join(missing)} not found in "
            f"{', '.join(str(d) for d in include_dirs())}; install the Xen development "
            "headers (Debian/Ubuntu: libxen-dev; Fedora/Qubes dom0: xen-devel) and run "
            "python -m dispoold.xen.build again"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dispoold-xen-build-") as tmp:
        built = Path(make_ffi().compile(tmpdir=tmp, verbose=verbose))
        target = output_dir / built.name
        # Replace atomically: a running daemon keeps its mapping of the old file.
        staging = output_dir / f".{built.name}.tmp"
        shutil.copyfile(built, staging)
        staging.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dispoold.xen.build",
        description="Compile dispoold's libxl/xenstore bindings against this host's Xen.",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="where to write the module (default: the installed dispoold/xen/)",
    )
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    args = parser.parse_args(argv)
    target = build(args.output_dir, verbose=args.verbose)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    print(f"built {target} (LIBXL_API_VERSION {API_VERSION}, {suffix})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
