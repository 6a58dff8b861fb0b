"""What the installed inference engines were built to use (``hardware.fallbacks.EngineCaps``).

Reads llama.cpp's GPU-offload support and ``llama_print_system_info()``, and onnxruntime's
available execution providers. Any thread; imports the engines (about half a second the first
time). A missing engine reads as "nothing available", never as an error.
"""

from __future__ import annotations

from hardware.fallbacks import EngineCaps, parse_system_info


def engine_caps() -> EngineCaps:
    offload, features = False, frozenset[str]()
    try:
        import llama_cpp

        offload = bool(llama_cpp.llama_supports_gpu_offload())
        features = parse_system_info(llama_cpp.llama_print_system_info().decode("utf-8", "replace"))
    except Exception:  # noqa: BLE001 - an engine that cannot load is reported by the registry
        pass
    providers: tuple[str, ...] = ()
    try:
        import onnxruntime

        providers = tuple(onnxruntime.get_available_providers())
    except Exception:  # noqa: BLE001
        pass
    return EngineCaps(offload, features, providers)
