"""Data engine (and, later, the trainer) of the bundled ``lcp-tiny`` model.

- :mod:`.speech`: speech corpus (espeak-ng voices + real clips -> mel features and
  mouth-opening / lip-width curves at 50 Hz);
- :mod:`.faces`: identity bank (portraits, morphs, procedural faces, augmentation);
- :mod:`.animate`: the mouth animator (numpy + OpenCV only);
- :mod:`.dataset`: ``build_corpus`` and ``TalkingFaceDataset``;
- :mod:`.corpus`: ``python -m lightningcp_cli.train.corpus OUT_DIR`` builds the corpus.

Nothing is imported here, so ``import lightningcp_cli.train.dataset`` pulls in only what
the dataset needs.  Design and licences: ``docs/DATA_ENGINE.md``.
"""
