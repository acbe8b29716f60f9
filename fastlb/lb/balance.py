"""Chooses the compiled ``balance_c`` or, with ``FASTLB_NO_EXTENSIONS=1``, its source ``balance_py``
(see fastlb/native.py)."""

from fastlb.native import EXTENSIONS, load

_impl = load("fastlb.lb.balance")
ALGORITHMS = _impl.ALGORITHMS
Balancer = _impl.Balancer
LeastConn = _impl.LeastConn
MaglevHash = _impl.MaglevHash
PowerOfTwo = _impl.PowerOfTwo
SmoothRoundRobin = _impl.SmoothRoundRobin
WeightedRandom = _impl.WeightedRandom
hash_key_getter = _impl.hash_key_getter
make_balancer = _impl.make_balancer
EXTENSION = EXTENSIONS

__all__ = ["EXTENSION", "ALGORITHMS", "Balancer", "LeastConn", "MaglevHash", "PowerOfTwo", "SmoothRoundRobin", "WeightedRandom", "hash_key_getter", "make_balancer"]
