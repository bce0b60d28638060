"""The on-disk format: segments and manifests (local or any pyarrow filesystem), salvage,
doctor, stored weights and the carried model.
"""
