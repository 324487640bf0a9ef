"""The data layer: where rows come from and how they become training examples.

* :mod:`.sources`  -- data flags -> a ``datasets.Dataset`` (hub, parquet, save_to_disk, imagefolder), checked
* :mod:`.images`   -- decoding any image cell to 8-bit RGB, resize + crop, tensors, image folders
* :mod:`.buckets`  -- aspect-ratio buckets (sizes, per-row assignment from image headers)
* :mod:`.sampling` -- deterministic, resumable batch samplers (plain and per bucket)
* :mod:`.dataset`  -- rows -> examples keyed by (epoch, index[, bucket]); collate
* :mod:`.cache`    -- the sharded on-disk latent/text cache and the data set that reads it
* :mod:`.cache_build` -- building it: every rank its share of the shards, resumable; :mod:`.shards`: file I/O
* :mod:`.streaming` -- parquet shards read in place (``--streaming``) and their windowed sampler
"""
