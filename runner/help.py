"""``python -m runner --help``: the config groups a user chooses from, the launchers, and the composed config.

Hydra's own ``--help`` lists every group in the config search path, including the ``schema/*`` groups that
only back the YAML files with types, and leaves out ``hydra/launcher``, the one Hydra group a user of runner
does choose. This renders the same template (``conf/hydra/help/runner.yaml``) with the groups that matter.
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import OmegaConf

#: Hydra groups a user of runner picks options of, and the options that are only bases of ours.
_HYDRA_GROUPS = ("hydra/launcher",)
_BASES = ("submitit_", "runner_")


def _groups(loader: object, parent: str = "") -> list[str]:
    from hydra.core.object_type import ObjectType

    found = []
    for group in loader.list_groups(parent):  # type: ignore[attr-defined]
        name = f"{parent}/{group}" if parent else group
        if loader.get_group_options(name, results_filter=ObjectType.CONFIG):  # type: ignore[attr-defined]
            found.append(name)
        found += _groups(loader, name)
    return found


def _shown(group: str) -> bool:
    return group in _HYDRA_GROUPS or not (group == "hydra" or group.startswith(("hydra/", "schema")))


def render(config_dir: str, overrides: Sequence[str]) -> str:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        lines = []
        for group in sorted(g for g in _groups(loader) if _shown(g)):
            options = [o for o in sorted(loader.get_group_options(group)) if not o.startswith(_BASES)]
            lines.append(f"{group}: {', '.join(options)}")
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    header, footer = str(cfg.hydra.help.header), str(cfg.hydra.help.footer)
    body = OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"]))
    return (
        f"{header}\n\n== Config groups ==\nChoose an option per group (e.g. model=vitb16):\n\n"
        + "\n".join(lines)
        + f"\n\n== Config ==\nOverride anything (e.g. trainer.batch_size=32):\n\n{body}\n{footer}\n"
    )
