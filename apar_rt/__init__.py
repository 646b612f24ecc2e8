"""apar-rt: a serving engine for APAR (auto-parallel auto-regressive) decoding."""

from apar_rt.core import RequestOutput, SamplingParams

__version__ = "0.1.0"


def __getattr__(name):  # LLM pulls in torch; import it only when asked for
    if name == "LLM":
        from apar_rt.llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "__version__"]
