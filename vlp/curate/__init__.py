"""Data curation: embed -> filter -> reshard, on the same shards and checkpoints vlp trains and evaluates.

  embed.py    image/text embeddings and the image-text cosine of every sample, one table per shard (store.py)
  rules.py    caption, image-size and CLIP-score rules: small functions over the tables, each counted
  dedup.py    exact duplicates (hashes) and SemDeDup near-duplicates (faiss k-means, cosine within clusters)
  balance.py  MetaCLIP balancing over a user's entry list, at most t pairs per entry
  filter.py   the rules composed in order -> decisions.tsv (shard, key, reason) and a report (report.py)
  reshard.py  the kept samples written as new shards, atomically, as make_shards writes them
"""
