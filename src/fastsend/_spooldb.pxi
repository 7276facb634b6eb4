# _spooldb.pxi: compiled twin of fastsend.spool.sqlite.RowWriter (the pure
# version there is the reference: multi-row INSERTs through Python's sqlite3).
#
# Spooling a list's rows was mostly binding: Python's sqlite3 binds each
# parameter through its own checks and SQLite copies every string it is
# given (SQLITE_TRANSIENT: a malloc under SQLite's memory mutex), ~0.2 us a
# parameter, three per row. Here the rows go into the spool connection's own
# database handle through the same multi-row INSERTs as the reference, each
# size prepared once: each row's rcpt, domain and vars bound where they lie
# (SQLITE_STATIC: the row objects outlive the step), stepped and reset, no
# Python object made per row. The same connection, so the same transaction
# as the rest of add_messages.
#
# SQLite's functions are looked up (dlsym) in the library the interpreter's
# own _sqlite3 module uses, so the handle and the functions are one SQLite;
# the handle is the first field of CPython's sqlite3.Connection (3.11-3.13),
# checked by the database file it names. Anything else: SpoolDBUnavailable,
# and the spool uses the reference (RowWriter in fastsend.spool.sqlite).

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.object cimport PyObject
from cpython.long cimport PyLong_AsLongLongAndOverflow

cdef extern from "dlfcn.h":
    void* dlopen(const char* filename, int flag)
    void* dlsym(void* handle, const char* symbol)
    int RTLD_NOW
    int RTLD_NOLOAD

ctypedef int (*_sq_prepare_t)(void*, const char*, int, void**, const char**) noexcept nogil
ctypedef int (*_sq_stmt_t)(void*) noexcept nogil
ctypedef int (*_sq_bind_ptr_t)(void*, int, const void*, int, void*) noexcept nogil
ctypedef int (*_sq_bind_i64_t)(void*, int, long long) noexcept nogil
ctypedef int (*_sq_bind_dbl_t)(void*, int, double) noexcept nogil
ctypedef int (*_sq_bind_null_t)(void*, int) noexcept nogil
ctypedef long long (*_sq_rowid_t)(void*) noexcept nogil
ctypedef const char* (*_sq_errmsg_t)(void*) noexcept nogil
ctypedef const char* (*_sq_filename_t)(void*, const char*) noexcept nogil
ctypedef void* (*_sq_handle_t)(void*) noexcept nogil

cdef struct _SQ:
    _sq_prepare_t prepare_v2
    _sq_stmt_t step
    _sq_stmt_t reset
    _sq_stmt_t finalize
    _sq_stmt_t clear_bindings
    _sq_bind_ptr_t bind_text
    _sq_bind_ptr_t bind_blob
    _sq_bind_i64_t bind_int64
    _sq_bind_dbl_t bind_double
    _sq_bind_null_t bind_null
    _sq_rowid_t last_insert_rowid
    _sq_errmsg_t errmsg
    _sq_filename_t db_filename
    _sq_handle_t db_handle

cdef _SQ _sq
cdef int _sq_state = 0  # 0 not looked up, 1 ready, -1 unavailable

cdef enum:
    _SQLITE_ROW = 100
    _SQLITE_DONE = 101

# SQLITE_STATIC is 0, SQLITE_TRANSIENT is -1 (the destructor argument)
cdef void* _SQ_STATIC = <void*>0
cdef void* _SQ_TRANSIENT = <void*>-1


class SpoolDBUnavailable(ImportError):
    """The compiled RowWriter cannot use this interpreter's SQLite (the spool
    uses the reference instead)."""


cdef int _sq_load() except -1:
    global _sq_state
    cdef void* h
    cdef bytes path
    if _sq_state == 1:
        return 0
    if _sq_state < 0:
        raise SpoolDBUnavailable("sqlite3 functions not found")
    _sq_state = -1
    import sys
    if not ((3, 11) <= sys.version_info[:2] <= (3, 13)):
        raise SpoolDBUnavailable("sqlite3.Connection's layout unknown for this Python")
    import _sqlite3
    path = _sqlite3.__file__.encode()
    h = dlopen(path, RTLD_NOW | RTLD_NOLOAD)
    if h == NULL:
        raise SpoolDBUnavailable("_sqlite3 not loaded")
    _sq.prepare_v2 = <_sq_prepare_t>dlsym(h, b"sqlite3_prepare_v2")
    _sq.step = <_sq_stmt_t>dlsym(h, b"sqlite3_step")
    _sq.reset = <_sq_stmt_t>dlsym(h, b"sqlite3_reset")
    _sq.finalize = <_sq_stmt_t>dlsym(h, b"sqlite3_finalize")
    _sq.clear_bindings = <_sq_stmt_t>dlsym(h, b"sqlite3_clear_bindings")
    _sq.bind_text = <_sq_bind_ptr_t>dlsym(h, b"sqlite3_bind_text")
    _sq.bind_blob = <_sq_bind_ptr_t>dlsym(h, b"sqlite3_bind_blob")
    _sq.bind_int64 = <_sq_bind_i64_t>dlsym(h, b"sqlite3_bind_int64")
    _sq.bind_double = <_sq_bind_dbl_t>dlsym(h, b"sqlite3_bind_double")
    _sq.bind_null = <_sq_bind_null_t>dlsym(h, b"sqlite3_bind_null")
    _sq.last_insert_rowid = <_sq_rowid_t>dlsym(h, b"sqlite3_last_insert_rowid")
    _sq.errmsg = <_sq_errmsg_t>dlsym(h, b"sqlite3_errmsg")
    _sq.db_filename = <_sq_filename_t>dlsym(h, b"sqlite3_db_filename")
    _sq.db_handle = <_sq_handle_t>dlsym(h, b"sqlite3_db_handle")
    if (_sq.prepare_v2 == NULL or _sq.step == NULL or _sq.reset == NULL
            or _sq.finalize == NULL or _sq.clear_bindings == NULL or _sq.bind_text == NULL
            or _sq.bind_blob == NULL or _sq.bind_int64 == NULL or _sq.bind_double == NULL
            or _sq.bind_null == NULL or _sq.last_insert_rowid == NULL or _sq.errmsg == NULL
            or _sq.db_filename == NULL or _sq.db_handle == NULL):
        raise SpoolDBUnavailable("sqlite3 functions not found")
    _sq_state = 1
    return 0


cdef inline void* _sq_db_of(object conn) noexcept:
    """CPython's pysqlite_Connection: PyObject_HEAD, then ``sqlite3 *db``
    (NULL once closed)."""
    return (<void**>((<char*><PyObject*>conn) + sizeof(PyObject)))[0]


cdef int _sq_bind(void* stmt, int i, object v) except -1:
    """``v`` bound as Python's sqlite3 binds it (str text, bytes a blob, int,
    float, None; another buffer copied as a blob). str and bytes are bound
    where they lie: the caller keeps them alive until the step."""
    cdef Py_ssize_t n
    cdef const char* p
    cdef int rc, overflow = 0
    cdef long long x
    cdef Py_buffer view
    if type(v) is str:
        p = PyUnicode_AsUTF8AndSize(v, &n)
        rc = _sq.bind_text(stmt, i, p, <int>n, _SQ_STATIC)
    elif type(v) is bytes:
        rc = _sq.bind_blob(stmt, i, PyBytes_AS_STRING(v), <int>PyBytes_GET_SIZE(v), _SQ_STATIC)
    elif type(v) is int:
        x = PyLong_AsLongLongAndOverflow(v, &overflow)
        if overflow:
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        rc = _sq.bind_int64(stmt, i, x)
    elif type(v) is float:
        rc = _sq.bind_double(stmt, i, <double>v)
    elif v is None:
        rc = _sq.bind_null(stmt, i)
    else:
        PyObject_GetBuffer(v, &view, PyBUF_SIMPLE)  # TypeError when it has none
        try:
            rc = _sq.bind_blob(stmt, i, view.buf, <int>view.len, _SQ_TRANSIENT)
        finally:
            PyBuffer_Release(&view)
    if rc != 0:
        raise MemoryError(f"sqlite3_bind: error {rc}")
    return 0


cdef enum:
    _RW_SIZES = 9  # statement sizes 1, 2, 4, ... 256 rows (ROWS_PER_STATEMENT)


cdef class RowWriter:
    """Rows spooled into ``messages`` through the spool connection ``db``
    (see fastsend.spool.sqlite.RowWriter, the reference: the same statements,
    ``sql(n, mixed)``, the same chunk sizes)."""

    cdef object db
    cdef object sql
    cdef void* handle
    cdef void* stmts[2][_RW_SIZES]  # [mixed][log2 rows]

    def __cinit__(self):
        cdef int m, k
        self.handle = NULL
        for m in range(2):
            for k in range(_RW_SIZES):
                self.stmts[m][k] = NULL

    def __init__(self, db, path, sql):
        import os
        import sqlite3
        cdef void* handle
        cdef const char* name
        _sq_load()
        if type(db) is not sqlite3.Connection:
            raise SpoolDBUnavailable("not a sqlite3.Connection")
        handle = _sq_db_of(db)
        if handle == NULL:
            raise SpoolDBUnavailable("connection closed")
        name = _sq.db_filename(handle, b"main")
        if name == NULL or os.path.realpath(name.decode()) != os.path.realpath(path):
            raise SpoolDBUnavailable("the connection's database is not the spool's")
        self.db = db
        self.sql = sql
        self.handle = handle

    cdef void _finalize(self) noexcept:
        cdef int m, k
        for m in range(2):
            for k in range(_RW_SIZES):
                if self.stmts[m][k] != NULL:
                    _sq.finalize(self.stmts[m][k])  # after close_v2: ends the connection
                    self.stmts[m][k] = NULL

    def close(self):
        """Finalize the statements (before the connection closes)."""
        self._finalize()

    def __dealloc__(self):
        self._finalize()

    cdef void* _stmt(self, int k, bint mixed) except NULL:
        cdef void* stmt = self.stmts[mixed][k]
        cdef const char* tail
        cdef bytes sql
        cdef int rc
        if stmt == NULL:
            import sqlite3
            sql = self.sql(1 << k, mixed).encode()
            rc = _sq.prepare_v2(self.handle, sql, <int>len(sql), &stmt, &tail)
            if rc != 0 or stmt == NULL:
                raise sqlite3.OperationalError(_sq.errmsg(self.handle).decode(errors="replace"))
            self.stmts[mixed][k] = stmt
        return stmt

    def insert(self, long long first, campaign, now, list rows, Py_ssize_t at,
               Py_ssize_t end, state, states):
        """Insert ``rows[at:end]`` (rcpt, domain, vars) of ``campaign`` at ``now``,
        each in ``state`` or, when ``states`` is a list, in its own
        ``states[k]``; the k-th row must get id ``first + k``. Returns the
        last id inserted when every row got its id, else the last id of the
        first statement whose ids differ (nothing after it is inserted)."""
        import sqlite3
        cdef void* stmt
        cdef Py_ssize_t n, j, k
        cdef int lg, p, width, rc
        cdef object row, rcpt, domain, v
        cdef long long rid = first + at - 1
        cdef bint mixed
        cdef list st = None
        if _sq_db_of(self.db) != self.handle:
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        if states is not None:
            st = states if type(states) is list else list(states)
        while at < end:
            n = end - at
            lg = _RW_SIZES - 1
            while (<Py_ssize_t>1 << lg) > n:
                lg -= 1
            n = <Py_ssize_t>1 << lg
            mixed = False
            if st is not None:
                for k in range(at, at + n):
                    if not (st[k] is state or st[k] == state):
                        mixed = True
                        break
            stmt = self._stmt(lg, mixed)
            width = 4 if mixed else 3
            try:
                _sq_bind(stmt, 1, campaign)
                _sq_bind(stmt, 2, now)
                _sq_bind(stmt, 3, state)
                p = 4
                for k in range(at, at + n):
                    row = rows[k]
                    rcpt, domain, v = row
                    _sq_bind(stmt, p, rcpt)
                    _sq_bind(stmt, p + 1, domain)
                    _sq_bind(stmt, p + 2, v)
                    if mixed:
                        _sq_bind(stmt, p + 3, st[k])
                    p += width
                rc = _sq.step(stmt)
                if rc != _SQLITE_DONE:
                    _sq.reset(stmt)
                    msg = _sq.errmsg(self.handle).decode(errors="replace")
                    if (rc & 0xFF) == 19:  # SQLITE_CONSTRAINT
                        raise sqlite3.IntegrityError(msg)
                    raise sqlite3.OperationalError(msg)
                _sq.reset(stmt)
            finally:
                _sq.clear_bindings(stmt)  # nothing left pointing at the rows
            rid = _sq.last_insert_rowid(self.handle)
            at += n
            if rid != first + at - 1:
                return rid
        return rid
