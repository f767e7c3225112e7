"""vla_runtime: a real-time runtime for pi0 / pi0.5 vision-language-action policies."""

__version__ = "0.1.0"
