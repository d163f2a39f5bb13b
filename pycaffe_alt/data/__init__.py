"""Caffe datasets: Datum records (:mod:`.datum`), images read as Caffe's OpenCV path reads them
(:mod:`.image`), LMDB/LevelDB access (:mod:`.db`) and the embedded MNIST subset (:mod:`.mnist5k`).
"""
