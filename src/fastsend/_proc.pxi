# _proc.pxi: compiled twin of fastsend.procs.set_pdeathsig (the pure
# version there is the reference: libc's prctl through ctypes). Called
# directly here, so a worker's start needs no ctypes: importing it cost the
# supervisor of every `fastsend send` ~1.5 ms of CPU.

cdef extern from "sys/prctl.h":
    int PR_SET_PDEATHSIG
    int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4,
              unsigned long arg5)


def set_pdeathsig(int sig):
    """Have the kernel send ``sig`` to this process when its parent dies
    (``prctl(PR_SET_PDEATHSIG)``): True when it is set."""
    return prctl(PR_SET_PDEATHSIG, <unsigned long>sig, 0, 0, 0) == 0
