"""Training, data, metrics and the experiment harness: installed with `pip install hf-neural-attention[train]`, never
shipped with a checkpoint (the model code in the parent folder does not import anything from here)."""
