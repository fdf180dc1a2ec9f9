// An LD_PRELOAD library that injects storage faults into one directory tree, for the fault-injection tests.
//
// Every process that loads it (Python, SentencePiece, safetensors and libtorch all write through libc) sees:
//   FAULT_ENOSPC_DIR=D, FAULT_ENOSPC_AFTER=N  writes to files under D fail with ENOSPC once N bytes were written
//                                             there (a disk that fills up midway; N=0: full from the start);
//   FAULT_EROFS_DIR=D                         opening a file under D for writing, creating, renaming, removing or
//                                             making a directory there fails with EROFS (a read-only mount);
//   FAULT_SLOW_FSYNC_DIR=D, FAULT_SLOW_FSYNC_MS=M  every fsync of a file or directory under D first sleeps M ms
//                                             (widens the window of a checkpoint save, so a test can kill it).
// Paths are compared by prefix after making them absolute (through the working directory, or /proc/self/fd for
// the *at calls); the tests pass absolute, normalized directories.

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static long long enospc_written = 0;

static void *real(const char *name) { return dlsym(RTLD_NEXT, name); }

static int under(const char *path, const char *dir) {
  if (!path || !dir || !*dir) return 0;
  size_t n = strlen(dir);
  return strncmp(path, dir, n) == 0 && (path[n] == '/' || path[n] == '\0');
}

// The absolute form of `path` relative to `dirfd` (AT_FDCWD: the working directory), in `out`.
static const char *absolute(int dirfd, const char *path, char *out, size_t size) {
  if (!path) return NULL;
  if (path[0] == '/') return path;
  char base[4096];
  if (dirfd == AT_FDCWD) {
    if (!getcwd(base, sizeof base)) return path;
  } else {
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
    ssize_t len = readlink(link, base, sizeof base - 1);
    if (len < 0) return path;
    base[len] = '\0';
  }
  snprintf(out, size, "%s/%s", base, path);
  return out;
}

static int fd_under(int fd, const char *dir) {
  if (!dir || !*dir) return 0;
  char link[64], target[4096];
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t len = readlink(link, target, sizeof target - 1);
  if (len < 0) return 0;
  target[len] = '\0';
  return under(target, dir);
}

static int path_under(int dirfd, const char *path, const char *env) {
  const char *dir = getenv(env);
  if (!dir || !*dir) return 0;
  char buffer[8192];
  return under(absolute(dirfd, path, buffer, sizeof buffer), dir);
}

// Whether a write of `count` bytes to `fd` must fail with ENOSPC (and counts the bytes that may go through).
static int no_space(int fd, size_t count) {
  const char *dir = getenv("FAULT_ENOSPC_DIR");
  if (!dir || !*dir || !fd_under(fd, dir)) return 0;
  const char *after = getenv("FAULT_ENOSPC_AFTER");
  long long limit = after ? atoll(after) : 0;
  if (enospc_written + (long long)count > limit) return 1;
  enospc_written += (long long)count;
  return 0;
}

ssize_t write(int fd, const void *buf, size_t count) {
  static ssize_t (*next)(int, const void *, size_t);
  if (!next) next = real("write");
  if (no_space(fd, count)) { errno = ENOSPC; return -1; }
  return next(fd, buf, count);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
  static ssize_t (*next)(int, const void *, size_t, off_t);
  if (!next) next = real("pwrite64");
  if (no_space(fd, count)) { errno = ENOSPC; return -1; }
  return next(fd, buf, count, offset);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) { return pwrite64(fd, buf, count, offset); }

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
  static ssize_t (*next)(int, const struct iovec *, int);
  if (!next) next = real("writev");
  size_t total = 0;
  for (int i = 0; i < iovcnt; i++) total += iov[i].iov_len;
  if (no_space(fd, total)) { errno = ENOSPC; return -1; }
  return next(fd, iov, iovcnt);
}

ssize_t sendfile64(int out_fd, int in_fd, off_t *offset, size_t count) {
  static ssize_t (*next)(int, int, off_t *, size_t);
  if (!next) next = real("sendfile64");
  if (no_space(out_fd, count)) { errno = ENOSPC; return -1; }
  return next(out_fd, in_fd, offset, count);
}

ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count) {
  return sendfile64(out_fd, in_fd, offset, count);
}

ssize_t copy_file_range(int fd_in, off_t *off_in, int fd_out, off_t *off_out, size_t len, unsigned int flags) {
  static ssize_t (*next)(int, off_t *, int, off_t *, size_t, unsigned int);
  if (!next) next = real("copy_file_range");
  if (no_space(fd_out, len)) { errno = ENOSPC; return -1; }
  return next(fd_in, off_in, fd_out, off_out, len, flags);
}

static int read_only(int dirfd, const char *path) { return path_under(dirfd, path, "FAULT_EROFS_DIR"); }

static int writes(int flags) { return (flags & (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC)) != 0; }

// The mode argument of an open call whose last named parameter is `flags`: passed only with O_CREAT or O_TMPFILE.
// A macro, because only the variadic function itself can read its arguments.
#define MODE_ARG(flags)                                                                                       \
  __extension__({                                                                                             \
    va_list args_;                                                                                            \
    va_start(args_, flags);                                                                                   \
    mode_t mode_ = ((flags) & O_CREAT) || ((flags) & __O_TMPFILE) == __O_TMPFILE ? va_arg(args_, mode_t) : 0; \
    va_end(args_);                                                                                            \
    mode_;                                                                                                    \
  })

int openat64(int dirfd, const char *path, int flags, ...) {
  static int (*next)(int, const char *, int, ...);
  if (!next) next = real("openat64");
  mode_t mode = MODE_ARG(flags);
  if (writes(flags) && read_only(dirfd, path)) { errno = EROFS; return -1; }
  return next(dirfd, path, flags, mode);
}

int openat(int dirfd, const char *path, int flags, ...) { return openat64(dirfd, path, flags, MODE_ARG(flags)); }

int open64(const char *path, int flags, ...) { return openat64(AT_FDCWD, path, flags, MODE_ARG(flags)); }

int open(const char *path, int flags, ...) { return openat64(AT_FDCWD, path, flags, MODE_ARG(flags)); }

int creat64(const char *path, mode_t mode) { return openat64(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode); }

int creat(const char *path, mode_t mode) { return creat64(path, mode); }

FILE *fopen64(const char *path, const char *mode) {
  static FILE *(*next)(const char *, const char *);
  if (!next) next = real("fopen64");
  if (strpbrk(mode, "wa+") && read_only(AT_FDCWD, path)) { errno = EROFS; return NULL; }
  return next(path, mode);
}

FILE *fopen(const char *path, const char *mode) { return fopen64(path, mode); }

int mkdirat(int dirfd, const char *path, mode_t mode) {
  static int (*next)(int, const char *, mode_t);
  if (!next) next = real("mkdirat");
  if (read_only(dirfd, path)) { errno = EROFS; return -1; }
  return next(dirfd, path, mode);
}

int mkdir(const char *path, mode_t mode) { return mkdirat(AT_FDCWD, path, mode); }

int renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, unsigned int flags) {
  static int (*next)(int, const char *, int, const char *, unsigned int);
  if (!next) next = real("renameat2");
  if (read_only(olddirfd, oldpath) || read_only(newdirfd, newpath)) { errno = EROFS; return -1; }
  return next(olddirfd, oldpath, newdirfd, newpath, flags);
}

int renameat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath) {
  return renameat2(olddirfd, oldpath, newdirfd, newpath, 0);
}

int rename(const char *oldpath, const char *newpath) { return renameat2(AT_FDCWD, oldpath, AT_FDCWD, newpath, 0); }

int unlinkat(int dirfd, const char *path, int flags) {
  static int (*next)(int, const char *, int);
  if (!next) next = real("unlinkat");
  if (read_only(dirfd, path)) { errno = EROFS; return -1; }
  return next(dirfd, path, flags);
}

int unlink(const char *path) { return unlinkat(AT_FDCWD, path, 0); }

int rmdir(const char *path) { return unlinkat(AT_FDCWD, path, AT_REMOVEDIR); }

static void slow_fsync(int fd) {
  if (!fd_under(fd, getenv("FAULT_SLOW_FSYNC_DIR"))) return;
  const char *ms = getenv("FAULT_SLOW_FSYNC_MS");
  long delay = ms ? atol(ms) : 100;
  struct timespec pause = {delay / 1000, (delay % 1000) * 1000000L};
  nanosleep(&pause, NULL);
}

int fsync(int fd) {
  static int (*next)(int);
  if (!next) next = real("fsync");
  slow_fsync(fd);
  return next(fd);
}

int fdatasync(int fd) {
  static int (*next)(int);
  if (!next) next = real("fdatasync");
  slow_fsync(fd);
  return next(fd);
}
