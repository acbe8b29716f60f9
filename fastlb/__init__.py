"""fastlb: a TLS-terminating HTTP/1.1 load balancer."""

__version__ = "0.1.0"
