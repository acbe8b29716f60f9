"""bench/breakdown.py's attribution of perf samples to the code that owns them (the perf run itself needs
root, perf and the bench's proxies, so it is exercised by hand, not here)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import breakdown  # noqa: E402

SITE = "/usr/lib/python3.11/site-packages"
SCRIPT = f"""
\t    1a2b PyObject_GetAttr (/usr/lib/libpython3.11.so.1.0)
\t    3c4d _PyObject_GetMethod (/usr/lib/libpython3.11.so.1.0)
\t    5e6f __pyx_f_TlsBio_shake (/srv/fastlb/net/tlsbio_c.cpython-311-x86_64-linux-gnu.so)
\t    7a8b uv_run ({SITE}/uvloop/loop.cpython-311-x86_64-linux-gnu.so)

\t    1111 _int_malloc (/usr/lib/x86_64-linux-gnu/libc.so.6)
\t    2222 CRYPTO_zalloc (/usr/lib/x86_64-linux-gnu/libcrypto.so.3)
\t    3333 SSL_do_handshake (/usr/lib/x86_64-linux-gnu/libssl.so.3)
\t    4444 __pyx_f_TlsBio_shake (/srv/fastlb/net/tlsbio_c.cpython-311-x86_64-linux-gnu.so)

\t    9999 __Pyx_PyObject_GetAttrStr (inlined)
\t    9999 __pyx_f_split_fields (/srv/fastlb/_core.cpython-311-x86_64-linux-gnu.so)

\t    aaaa tcp_sendmsg ([kernel.kallsyms])
\t    bbbb __GI___writev (/usr/lib/x86_64-linux-gnu/libc.so.6)
\t    cccc ngx_linux_sendfile_chain (/usr/sbin/nginx)

\t    dddd insertdict (/usr/lib/libpython3.11.so.1.0)
\t    eeee [unknown] ([unknown])

\t    ffff method_vectorcall_NOARGS (/usr/lib/libpython3.11.so.1.0)
\t    0abc cipher_to_tuple ({SITE}/../lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so)
"""


def test_each_sample_goes_to_the_innermost_frame_outside_the_runtime_and_libc():
    counts = breakdown.attribute(SCRIPT)
    assert counts == {
        "fastlb net.tlsbio_c": 1,  # the runtime's lookup serves the TlsBio that asked for it
        "OpenSSL": 1,  # malloc serves libcrypto
        "fastlb _core": 1,  # an inlined frame takes the object of its address's real frame
        "kernel": 1,
        "Python runtime, libc": 1,  # nothing outside the runtime on the stack
        "stdlib _ssl": 1,
    }


def test_the_proxy_binary_owns_its_own_frames():
    assert breakdown.owner("/usr/sbin/nginx") == "nginx"
    assert breakdown.owner("/usr/sbin/haproxy") == "haproxy"
    assert breakdown.owner(f"{SITE}/uvloop/loop.cpython-311-x86_64-linux-gnu.so") == "uvloop"
    assert (
        breakdown.owner("/srv/fastlb/http/protocol_c.cpython-311-x86_64-linux-gnu.so")
        == "fastlb http.protocol_c"
    )
    assert breakdown.owner("/usr/lib/x86_64-linux-gnu/libc.so.6") is None
