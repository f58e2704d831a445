"""Families register themselves from their own modules, carry their facts on the class, keep no call-order state,
and the exported classes' guidance-off defaults are the families' (the exported file cannot import them)."""

from __future__ import annotations

import ast
import inspect

import pytest

from danceopd_diffusers.families import FAMILIES, FamilyAdapter, register_family
from danceopd_diffusers.pipelines import EXPORTED_PIPELINE_MODULE
from danceopd_diffusers.pipelines import pipeline_danceopd as exported


def test_each_family_is_registered_by_its_own_module():
    assert list(FAMILIES)[:3] == ["sd3", "flux", "flux-kontext"]  # registration order: the order users see
    for name, family_cls in FAMILIES.items():
        assert family_cls.name == name
        assert family_cls.__module__.startswith("danceopd_diffusers.families.")


def test_register_family_refuses_a_second_family_of_one_name():
    class Impostor(FamilyAdapter):
        name = "sd3"
        pipeline_class_names = ("StableDiffusion3Pipeline",)

    with pytest.raises(ValueError, match="Two families are named 'sd3'"):
        register_family(Impostor)
    assert FAMILIES["sd3"].__name__ == "SD3Family"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_class_facts_need_no_instance(name):
    family_cls = FAMILIES[name]
    assert (
        family_cls.pipeline_class().__name__.endswith("Pipeline")
        or "WithSources" in family_cls.pipeline_class().__name__
    )
    assert family_cls.transformer_class().__name__ == family_cls.transformer_class_name
    assert isinstance(family_cls.default_lora_targets, tuple) and family_cls.default_lora_targets
    assert family_cls.pipeline_class_names[-1] == family_cls.custom_pipeline_class_name


@pytest.mark.parametrize("name", list(FAMILIES))
def test_exported_defaults_are_the_familys_guidance_off_call(name):
    """The exported class's own defaults are the family's ``unguided_call_kwargs()`` less what each export records
    (the embedded guidance a student was trained at) and private switches."""
    family = FAMILIES[name]()
    cls = getattr(exported, family.custom_pipeline_class_name)
    expected = {
        k: v
        for k, v in family.unguided_call_kwargs().items()
        if not k.startswith("_") and not (family.has_embedded_guidance and k == "guidance_scale")
    }
    assert cls._unguided_defaults == expected
    assert exported.UNGUIDED_DEFAULTS[family.pipeline_class_names[0]] == expected


def test_the_exported_module_has_one_name():
    assert exported.EXPORTED_PIPELINE_MODULE == EXPORTED_PIPELINE_MODULE


def test_exported_init_exposes_the_stock_components_and_the_config_entries():
    for cls in exported._DanceOPDPipeline.__subclasses__():
        stock = cls.__bases__[-1]
        params = inspect.signature(cls.__init__).parameters
        assert list(params)[: len(inspect.signature(stock.__init__).parameters)] == list(
            inspect.signature(stock.__init__).parameters
        )
        assert set(exported.CONFIG_ENTRIES) <= set(params)


def test_no_adapter_keeps_state_between_calls():
    """Adapters set attributes only in ``__init__`` (their run options): nothing one call leaves for the next."""
    for module in {inspect.getmodule(cls) for cls in FAMILIES.values()}:
        tree = ast.parse(inspect.getsource(module))
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            for method in (n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name != "__init__"):
                for node in ast.walk(method):
                    targets = getattr(node, "targets", None) or [getattr(node, "target", None)]
                    for target in targets:
                        assert not (
                            isinstance(target, ast.Attribute)
                            and isinstance(target.value, ast.Name)
                            and target.value.id == "self"
                        ), f"{module.__name__}.{cls.name}.{method.name} sets self.{target.attr}"
