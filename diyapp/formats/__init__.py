"""Every file format diyapp reads or writes, one module each, over one shared core.

``common`` (errors, the loaded-model record, metadata, atomic writes, header checks) is imported by
every format; ``pt``, ``json``, ``hf`` are peers that never import one another; ``catalog`` opens,
describes and lists any of them and is the only module that knows them all.
"""
