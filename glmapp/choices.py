"""Values a user picks from on the command line, importable without torch.

`--help` lists them and must not wait for torch to import, so they live here and the modules that act on
them (`checkpoint`, `quant`, `demo`) take them from here.
"""

DEFAULT_MODEL = "THUDM/chatglm2-6b"
QUANT_MODES = ("none", "int8", "int4", "bnb-int8", "bnb-nf4")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # "auto": bf16/fp16 on GPU, fp32 on CPU
FAMILIES = ("chatglm1", "chatglm2", "chatglm3")
DEMO_SIZES = ("tiny", "small", "mid")  # the keys of glmapp.demo.SIZES
DEMO_FORMATS = ("safetensors-sharded", "safetensors", "bin-sharded")
# Where the Chat tab's sliders start: the official web demos' values (THUDM/ChatGLM2-6B web_demo.py,
# THUDM/ChatGLM3 web_demo_gradio.py).
DEMO_DEFAULTS = {
    "chatglm1": dict(max_length=2048, top_p=0.7, temperature=0.95),  # THUDM/ChatGLM-6B web_demo.py
    "chatglm2": dict(max_length=8192, top_p=0.8, temperature=0.95),
    "chatglm3": dict(max_length=8192, top_p=0.8, temperature=0.6),
}
