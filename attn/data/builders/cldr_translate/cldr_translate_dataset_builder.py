"""cldr_translate: real English -> X translation pairs from the Unicode CLDR data in `babel`.

What it is: for one target language, every CLDR display name that exists in both English and
that language: names of territories, languages, scripts, currencies, measurement units, months,
weekdays and quarters (e.g. `United Kingdom` -> `Vereinigtes Königreich`, `square kilometers`
-> `Quadratkilometer`). These are human translations maintained by the Unicode consortium, so
it is a small but genuine translation task (with non-ASCII text in most targets).

Features: `en` (source), `target` (translation), `category` (e.g. `territories`) and `key`
(the CLDR code, e.g. `GB`). Pairs whose two sides are identical strings are dropped (codes and
loanwords that teach nothing).

Splits: `test` when the first byte of sha256(category/key) is < 26 (~10%), else `train`; the
same concept lands in the same split for every language. Configs: `en_de`, `en_fr`, `en_es`,
`en_it`, `en_pt`, `en_nl`, `en_ru`, `en_ja` (1,100-1,550 pairs each with babel 2.18; the number
depends on the babel version, which is recorded in the metadata).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import tensorflow_datasets as tfds

LANGUAGES = ("de", "fr", "es", "it", "pt", "nl", "ru", "ja")
_TEST_BELOW = 26  # First hash byte < 26 of 256: ~10%.


class CldrConfig(tfds.core.BuilderConfig):
  """One target language."""

  def __init__(self, *, target: str, **kwargs):
    super().__init__(**kwargs)
    self.target = target


def _names(locale) -> dict[tuple[str, str], str]:
  """(category, key) -> display name in one babel Locale."""
  from babel import units

  out: dict[tuple[str, str], str] = {}
  for category in ("territories", "languages", "scripts"):
    for key, name in getattr(locale, category).items():
      out[(category, str(key))] = name
  for key, name in locale.currencies.items():
    out[("currencies", key)] = name
  for key, name in locale.months["format"]["wide"].items():
    out[("months", str(key))] = name
  for key, name in locale.days["format"]["wide"].items():
    out[("days", str(key))] = name
  for key, name in locale.quarters["format"]["wide"].items():
    out[("quarters", str(key))] = name
  for key in sorted(locale.unit_display_names):
    name = units.get_unit_name(key, length="long", locale=locale)
    if name:
      out[("units", key)] = name
  return out


def pairs(target: str) -> list[dict[str, str]]:
  """All English -> `target` pairs, sorted by (category, key)."""
  from babel import Locale

  source, translated = _names(Locale("en")), _names(Locale(target))
  out = []
  for (category, key) in sorted(source.keys() & translated.keys()):
    en, tgt = source[(category, key)].strip(), translated[(category, key)].strip()
    if en and tgt and en != tgt:
      out.append({"en": en, "target": tgt, "category": category, "key": key})
  return out


def split_of(category: str, key: str) -> str:
  """`test` for ~10% of concepts chosen by hash, else `train`."""
  digest = hashlib.sha256(f"{category}/{key}".encode()).digest()
  return "test" if digest[0] < _TEST_BELOW else "train"


class CldrTranslate(tfds.core.GeneratorBasedBuilder):
  """English -> X display names from Unicode CLDR (via babel)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [CldrConfig(name=f"en_{lang}", target=lang) for lang in LANGUAGES]

  def _info(self) -> tfds.core.DatasetInfo:
    import babel

    return self.dataset_info_from_configs(
      description=__doc__,
      features=tfds.features.FeaturesDict({
        "en": tfds.features.Text(), "target": tfds.features.Text(),
        "category": tfds.features.Text(), "key": tfds.features.Text(),
      }),
      supervised_keys=("en", "target"),
      metadata=tfds.core.MetadataDict(babel_version=babel.__version__,
                                      target_language=self.builder_config.target),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The CLDR data ships inside babel: nothing to download.
    by_split: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    for pair in pairs(self.builder_config.target):
      by_split[split_of(pair["category"], pair["key"])].append(pair)
    return {name: self._generate_examples(items) for name, items in by_split.items()}

  def _generate_examples(self, items: list[dict[str, str]]) -> Iterator[tuple[str, dict]]:
    for item in items:
      yield f"{item['category']}/{item['key']}", item
