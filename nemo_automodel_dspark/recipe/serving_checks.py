"""`recipe_args.serve_with`: the engine rules (export/engines.py) applied to a recipe's options, before anything loads.

At parse time only the options are known (Markov head, confidence head, explicit ids such as -1); right after the
target's config.json is read, its depth and family complete the check. With `serve_with` set, the first finding for a
listed engine is a ConfigError; unset, every engine's findings are returned for one start-up warning.
"""

from __future__ import annotations

from nemo_automodel_dspark.export.engines import ENGINES, DraftOptions, Finding, check_unknown_engines, findings


def serving_options(config, target_config=None) -> DraftOptions:
    """The engine-relevant view of a parsed config's draft options (+ the target's depth and family once read)."""
    draft = config.draft
    num_layers = family = None
    if target_config is not None:
        from nemo_automodel_dspark.model.families import family_for

        target_family = family_for(target_config)
        num_layers, family = target_family.text_config(target_config).num_hidden_layers, target_family.name
    return DraftOptions(
        markov_rank=draft.markov_rank,
        markov_head_type=draft.markov_head_type,
        enable_confidence_head=draft.enable_confidence_head,
        confidence_head_with_markov=draft.confidence_head_with_markov,
        target_layer_ids=None if draft.target_layer_ids is None else list(draft.target_layer_ids),
        num_target_layers=num_layers,
        family=family,
    )


def check_serving(config, target_config=None, error: type[Exception] = ValueError) -> list[Finding]:
    """Raise `error` (one line: key, engine, fix) for a `serve_with` engine; else return all engines' findings.

    `config` is a parsed `DSparkRecipeConfig` (`serve_with` from its recipe_args, the options from its draft).
    """
    serve_with = config.recipe_args.serve_with
    if serve_with is not None:
        unknown = check_unknown_engines(list(serve_with))
        if unknown:
            raise error(f"'recipe_args.serve_with': unknown engine {unknown[0]!r}; choose from {', '.join(ENGINES)}")
        listed = findings(serving_options(config, target_config), list(serve_with))
        if listed:
            raise error(listed[0].message())
        return []
    return findings(serving_options(config, target_config))


def warning_text(found: list[Finding]) -> str:
    """One start-up warning listing every engine's findings (empty when the draft is servable everywhere)."""
    if not found:
        return ""
    lines = [f"  {f.message()}" for f in found]
    return "\n".join(
        ["serving: this draft will not load everywhere (set recipe_args.serve_with to make these errors):", *lines]
    )
