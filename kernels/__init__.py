"""Triton kernels and their launch functions, installed as glm_awq.kernels (never a top-level `kernels`)."""

if __name__ != "glm_awq.kernels":
    raise ModuleNotFoundError(
        f"this folder is the package glm_awq.kernels and must not be imported as {__name__!r}; "
        "install glm_awq (pip install -e .) and import glm_awq.kernels"
    )
