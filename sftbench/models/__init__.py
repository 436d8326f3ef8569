"""The model seam: one interface (``spec.ModelSpec``) that training, the data, the plan, the memory predictor and the
save folder ask, a Pangu-α implementation (``pangu``) and one for any transformers causal LM (``hf``), and the
resolution of ``--model`` (``resolve``). Torch-free at import; imports nothing itself."""
