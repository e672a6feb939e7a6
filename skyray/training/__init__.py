"""Training the ``tiny-trained`` model: procedural scenes, their captions, and the training loops.

Nothing here runs during a render; the renderer only loads the weights this package produced
(``skyray/assets/tiny_trained``, see ``skyray model train-tiny``, ``build.py``).
"""
