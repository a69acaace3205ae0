"""DLRM with MEC embedding compression: pretrain -> compress -> train (see main.py)."""
