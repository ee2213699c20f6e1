"""Library code of the baselines (the tasks live in :mod:`ppd.tasks`, the evaluation rows in :mod:`ppd.eval.methods`).

* :mod:`ppd.baselines.mask_losses`: pure losses on SAM mask logits (SAMPO, Proxy Prompt, supervised fine-tuning);
* :mod:`ppd.baselines.preference`: SAMPO's online prompt-centric preference mining;
* :mod:`ppd.baselines.sparse`: SAM prediction from seeded sparse GT clicks (SAMPO validation and its eval rows).
"""
