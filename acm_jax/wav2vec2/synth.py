"""The embedded speech default: utterances synthesised offline with eSpeak NG.

eSpeak NG comes with the `espeakng-loader` wheel (the shared library and its
voice data, no system package) and is driven through ctypes in synchronous mode:
a callback collects 16-bit samples at the library's rate (22,050 Hz), resampled
to 16 kHz. Sentences are random word sequences from a built-in vocabulary (the
first `num_words` of 408 Spanish words, as Common Voice es, or of 338 English ones), spoken by many
voices (language variants x voice variants), rates and pitches, padded with
silence, mixed with noise at a random SNR and scaled by a random gain, so that
utterances differ in difficulty.

Splits: test voices are never used in training, and no test sentence is a train
sentence. Every choice (sentence, voice, rate, pitch, padding, SNR, gain, noise)
is a function of `SpeechSynthConfig` (seed included), and so is the audio, to the
bit: eSpeak NG draws from its own and libc's random generators (seeded here per
utterance) and carries state from one call to the next that neither
`espeak_Terminate` nor a seed clears, so each split is synthesised in a fresh
process (spawned) where the sequence of calls is always the same. The result is
stored as an .npz under the cache directory after the first build.
Each utterance also keeps where its clean speech is (10 ms resolution), which
defines the speech vs silence/noise-only frames that eval reports mean k on.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import hashlib
import json
import multiprocessing
import os
import threading
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
SPAN_HOP = 160  # samples per entry of the speech mask (10 ms)

# The first 48 words of each list are the original small vocabulary (`num_words=48` rebuilds that set
# bit for bit); the rest widen it with words whose spelling a model has to remember (Spanish b/v, silent h,
# c/z/s, ll/y; English silent letters and homophones), so that a bigger vocabulary is also a bigger lookup.
_BASE_WORDS = {
    "es": ("el la un una casa perro gato niño niña mesa agua pan leche sol luna mar río árbol flor libro "
           "rojo azul verde grande pequeño bonito viejo nuevo come bebe mira tiene quiere corre salta "
           "duerme canta lee abre cierra hoy mañana aquí allí muy siempre nunca"),
    "en": ("the a house dog cat child table water bread milk sun moon sea river tree flower book red blue "
           "green big small pretty old new eats drinks sees has wants runs jumps sleeps sings reads opens "
           "closes today tomorrow here there very always never"),
}
_MORE_WORDS = {
    "es": """
hombre mujer padre madre hermano hermana hijo hija abuelo abuela amigo amiga vecino maestro médico
ciudad pueblo calle plaza camino puente puerta ventana pared techo suelo cocina baño jardín campo bosque
montaña playa isla lago cielo nube lluvia nieve viento fuego tierra piedra arena hierba hoja rama raíz
caballo vaca oveja cabra cerdo gallina pájaro pez ratón conejo lobo zorro oso tigre león ballena abeja
mariposa hormiga serpiente tortuga manzana naranja plátano uva fresa limón tomate cebolla patata arroz
queso huevo carne pollo sopa sal azúcar aceite vino café zumo galleta pastel mantequilla miel harina
silla cama sofá lámpara espejo reloj llave vaso plato taza cuchara cuchillo tenedor botella caja bolsa
zapato camisa falda abrigo sombrero guante bufanda vestido llavero cartera papel lápiz carta regalo
juguete pelota muñeca barco avión tren coche bicicleta autobús camión rueda motor viaje vuelta hora
semana mes año verano invierno otoño primavera noche tarde mediodía lunes martes jueves viernes sábado
domingo blanco negro gris amarillo marrón rosa morado dulce salado amargo caliente frío tibio
alto bajo largo corto ancho estrecho rápido lento fuerte débil feliz triste cansado enfermo limpio sucio
lleno vacío pesado ligero fácil difícil rico pobre joven hermoso feo suave duro blando claro oscuro
habla escucha escribe camina vuela nada trabaja juega baila llora ríe piensa sabe busca encuentra lleva
trae pone saca lava compra vende paga llama llega sale entra sube baja vuelve empieza termina
ayuda cuida guarda toca huele prueba siente sueña vive muere nace crece cambia viaja visita espera
hace dice puede debe conoce sigue gira cruza salva cubre enciende apaga rompe arregla construye
jamás ahora luego antes después pronto también tampoco quizá bastante poco mucho todo
algo alguien nadie cada otro mismo tanto cerca lejos dentro fuera arriba abajo delante detrás
hacia hasta desde entre sobre contra según sin con para por porque pero aunque como cuando donde
yo tú él ella nosotros ellos usted mi tu su nuestro este ese aquel esta esa aquella uno dos tres cuatro
cinco seis siete ocho nueve diez cien mil primero segundo último mitad doble zanahoria hielo
bota voz vez hoz haz caza cazo cayo callo valla baya hola ola hierro yerba yate""",
    "en": """
man woman father mother brother sister son daughter friend neighbour teacher doctor knight queen king
city town street square road bridge door window wall roof floor kitchen garden field forest mountain
beach island lake sky cloud rain snow wind fire earth stone sand grass leaf branch root horse cow sheep
goat pig chicken bird fish mouse rabbit wolf fox bear tiger lion whale bee butterfly ant snake turtle
apple orange banana grape strawberry lemon tomato onion potato rice cheese egg meat soup salt sugar oil
wine coffee juice cookie cake butter honey flour chair bed sofa lamp mirror clock key glass plate cup
spoon knife fork bottle box bag shoe shirt skirt coat hat glove scarf dress wallet paper pencil letter
gift toy ball doll boat plane train car bicycle bus truck wheel engine journey hour week month year
summer winter autumn spring night evening noon monday tuesday wednesday thursday friday saturday sunday
white black grey yellow brown pink purple sweet salty bitter hot cold warm tall short long wide narrow
fast slow strong weak happy sad tired sick clean dirty full empty heavy light easy hard rich poor young
beautiful ugly soft bright dark talks listens writes walks flies swims works plays dances cries laughs
thinks knows looks finds carries brings puts takes washes cooks buys sells pays calls arrives leaves
enters climbs returns begins finishes helps keeps touches smells tastes feels dreams lives dies grows
changes travels visits waits makes says could should would thought through though tough laugh cough
enough knee knot write wrong whole honest listen castle often answer sword two
too to four for fore eight ate one won see blew rite know no knew
weigh way wait weight heir air pair pear bare flower meet piece peace quite quiet""",
}
WORDS = {lang: tuple(dict.fromkeys(_BASE_WORDS[lang].split() + _MORE_WORDS[lang].split())) for lang in _BASE_WORDS}
BASE_VOCABULARY = 48  # words of the original small vocabulary, first in each list
BASE_VOICES = {"es": ("es", "es-419"), "en": ("en", "en-us")}
VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2", "croak")

# espeak_AUDIO_OUTPUT and espeak_PARAMETER values from the library's public header
_SYNCHRONOUS = 2
_CHARS_UTF8 = 1
_RATE, _PITCH = 1, 3


# 2: seeded eSpeak NG, one fresh process per split (bit-reproducible); 1 (unnamed): jitter between builds
CACHE_FORMAT = 2


@dataclasses.dataclass(frozen=True)
class SpeechSynthConfig:
  language: str = "es"
  num_train: int = 2400
  num_test: int = 240
  min_words: int = 1
  max_words: int = 3
  num_words: int = BASE_VOCABULARY  # sentences use the first num_words words of the language's list
  test_voices: int = 6
  max_seconds: float = 3.0
  snr_db: tuple[float, float] = (10.0, 40.0)
  gain_db: tuple[float, float] = (-12.0, 6.0)
  rate_wpm: tuple[int, int] = (130, 210)
  pitch: tuple[int, int] = (25, 75)
  pad_seconds: tuple[float, float] = (0.05, 0.5)
  seed: int = 0

  def validate(self) -> "SpeechSynthConfig":
    if self.language not in WORDS:
      raise ValueError(f"no built-in vocabulary for language {self.language!r}; expected one of {sorted(WORDS)}")
    if not 1 <= self.min_words <= self.max_words:
      raise ValueError(f"need 1 <= min_words <= max_words, got {self.min_words}, {self.max_words}")
    if not 1 <= self.num_words <= len(WORDS[self.language]):
      raise ValueError(f"num_words must be in 1..{len(WORDS[self.language])} for {self.language!r}, "
                       f"got {self.num_words}")
    low, high = self.pad_seconds
    if not 0 <= low <= high or 2 * high >= self.max_seconds:
      raise ValueError(f"pad_seconds must be 0 <= low <= high < max_seconds / 2, got {self.pad_seconds} "
                       f"with max_seconds={self.max_seconds}")
    if not 0 < self.test_voices < len(voices(self.language)):
      raise ValueError(f"test_voices must be in 1..{len(voices(self.language)) - 1}, got {self.test_voices}")
    if self.num_train < 1 or self.num_test < 1:
      raise ValueError(f"num_train and num_test must be >= 1, got {self.num_train}, {self.num_test}")
    return self

  def cache_name(self) -> str:
    fields = dataclasses.asdict(self) | {"format": CACHE_FORMAT}
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    return f"speech_synth_{self.language}_{digest}.npz"


def voices(language: str) -> list[str]:
  return [base + (f"+{v}" if v else "") for base in BASE_VOICES[language] for v in VARIANTS]


def voice_split(config: SpeechSynthConfig) -> tuple[list[str], list[str]]:
  """(train voices, test voices), disjoint, chosen by the seed."""
  names = voices(config.language)
  order = np.random.default_rng([config.seed, 1]).permutation(len(names))
  test = sorted(names[i] for i in order[:config.test_voices])
  return [v for v in names if v not in test], test


class ESpeak:
  """A process-wide handle on libespeak-ng (the library keeps global state)."""
  _lock = threading.RLock()
  _instance: "ESpeak | None" = None

  def __init__(self):
    try:
      import espeakng_loader
    except ImportError:
      raise ImportError("the embedded speech set needs eSpeak NG: pip install espeakng-loader") from None
    self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
    self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    self.lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                      ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    self._data_path = espeakng_loader.get_data_path().encode()
    self.lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    self._libc = ctypes.CDLL(None)  # the process's libc, whose rand() the library also calls
    self._chunks: list[np.ndarray] = []
    callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
    self._callback = callback_type(self._collect)  # kept alive as long as the library may call it
    self.reset()

  def reset(self) -> None:
    """Terminates and re-initialises the library: voices and parameters reset, but not all of its
    state (see the module docstring; `generate` runs each split in a fresh process for that)."""
    with self._lock:
      if getattr(self, "rate", None) is not None:
        self.lib.espeak_Terminate()
      self.rate = self.lib.espeak_Initialize(_SYNCHRONOUS, 0, self._data_path, 0)
      if self.rate <= 0:
        raise RuntimeError(f"espeak_Initialize failed (returned {self.rate})")
      self.lib.espeak_SetSynthCallback(self._callback)

  def _collect(self, samples, count, events) -> int:
    if count > 0:
      self._chunks.append(np.ctypeslib.as_array(samples, (count,)).copy())
    return 0  # 0: go on synthesising

  @classmethod
  def get(cls) -> "ESpeak":
    with cls._lock:
      if cls._instance is None:
        cls._instance = cls()
      return cls._instance

  def synthesize(self, text: str, voice: str, rate_wpm: int, pitch: int, seed: int = 0) -> np.ndarray:
    """float32 waveform in [-1, 1] at 16 kHz. The same call gives the same samples only
    after the same earlier calls in a fresh process (see the module docstring)."""
    from scipy.signal import resample_poly
    with self._lock:
      self.lib.espeak_ng_SetRandSeed(seed)
      self._libc.srand(ctypes.c_uint(seed % 2**32))
      if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise ValueError(f"eSpeak NG has no voice {voice!r}")
      self.lib.espeak_SetParameter(_RATE, rate_wpm, 0)
      self.lib.espeak_SetParameter(_PITCH, pitch, 0)
      self._chunks = []
      data = text.encode()
      status = self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, _CHARS_UTF8, None, None)
      if status != 0:
        raise RuntimeError(f"espeak_Synth failed with status {status} for {text!r}")
      wave = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
    if self.rate != 22050:
      raise RuntimeError(f"eSpeak NG runs at {self.rate} Hz; expected 22050")
    return resample_poly(wave.astype(np.float32) / 32768.0, 160, 221).astype(np.float32)


def _sentences(config: SpeechSynthConfig) -> tuple[list[str], list[str]]:
  """Disjoint pools of train and test sentences."""
  rng = np.random.default_rng([config.seed, 2])
  words = list(WORDS[config.language][:config.num_words])
  pool: dict[str, None] = {}
  wanted = config.num_train + config.num_test
  for _ in range(50 * wanted):
    n = rng.integers(config.min_words, config.max_words + 1)
    pool[" ".join(rng.choice(words, n))] = None
    if len(pool) >= wanted // 2 + config.num_test:
      break
  sentences = list(pool)
  num_test_sentences = max(1, min(config.num_test, len(sentences) // 5))
  return sentences[num_test_sentences:], sentences[:num_test_sentences]


def _speech_mask(clean: np.ndarray, pad: int, total: int) -> np.ndarray:
  """(total // SPAN_HOP,) bool: 10 ms bins with clean speech energy within 30 dB of the peak."""
  padded = np.zeros(total, np.float32)
  padded[pad:pad + len(clean)] = clean
  bins = padded[: total // SPAN_HOP * SPAN_HOP].reshape(-1, SPAN_HOP)
  energy = np.sqrt(np.mean(np.square(bins), axis=1))
  return energy > 10 ** (-30 / 20) * max(float(energy.max()), 1e-8)


def _utterances(config: SpeechSynthConfig, split: str, sentences: list[str], voice_names: list[str],
                count: int) -> dict[str, np.ndarray]:
  engine = ESpeak.get()
  engine.reset()
  rng = np.random.default_rng([config.seed, 3 if split == "train" else 4])
  max_samples = int(config.max_seconds * SAMPLE_RATE)
  audio, offsets, masks, texts, voice_of = [], [0], [], [], []
  while len(texts) < count:
    text = sentences[len(texts) % len(sentences)] if split == "test" else sentences[rng.integers(len(sentences))]
    voice = voice_names[rng.integers(len(voice_names))]
    rate, pitch = int(rng.integers(*config.rate_wpm)), int(rng.integers(*config.pitch))
    pads, snr_db, gain_db = rng.uniform(*config.pad_seconds, 2), rng.uniform(*config.snr_db), rng.uniform(*config.gain_db)
    noise_rng = np.random.default_rng([config.seed, 5, len(texts), int(rng.integers(2**31))])
    # eSpeak's seed from a stream of its own, so the draws above are those of earlier builds
    clean = engine.synthesize(text, voice, rate, pitch, seed=int(np.random.default_rng([config.seed, 6, len(texts)])
                                                                 .integers(2**31)))
    lead, trail = (int(SAMPLE_RATE * p) for p in pads)
    total = lead + len(clean) + trail
    if total > max_samples:  # too long for the fixed batch shape: draw another
      continue
    wave = np.zeros(total, np.float32)
    wave[lead:lead + len(clean)] = clean
    signal_power = np.mean(np.square(clean)) + 1e-10
    noise_power = signal_power / 10 ** (snr_db / 10)
    wave += noise_rng.normal(0.0, np.sqrt(noise_power), total).astype(np.float32)
    wave *= 10 ** (gain_db / 20)
    audio.append(np.clip(wave, -1.0, 1.0))
    offsets.append(offsets[-1] + total)
    masks.append(_speech_mask(clean, lead, total))
    texts.append(text)
    voice_of.append(voice)
  return {"audio": np.round(np.concatenate(audio) * 32767).astype(np.int16), "offsets": np.array(offsets),
          "speech_mask": np.concatenate(masks), "mask_offsets": np.cumsum([0] + [len(m) for m in masks]),
          "text": np.array(texts), "voice": np.array(voice_of)}


def default_cache_dir() -> Path:
  return Path(os.environ.get("ACM_JAX_CACHE", Path.home() / ".cache" / "acm_jax"))


def generate(config: SpeechSynthConfig, cache_dir: str | Path | None = None) -> dict[str, dict[str, np.ndarray]]:
  """{"train": arrays, "test": arrays}; see `_utterances` for the arrays. Cached."""
  config.validate()
  path = Path(cache_dir or default_cache_dir()) / config.cache_name()
  if path.exists():
    with np.load(path, allow_pickle=False) as data:
      return {split: {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(split + "/")}
              for split in ("train", "test")}
  train_voices, test_voices = voice_split(config)
  train_sentences, test_sentences = _sentences(config)
  jobs = {"train": (config, "train", train_sentences, train_voices, config.num_train),
          "test": (config, "test", test_sentences, test_voices, config.num_test)}
  # a fresh process per split: eSpeak NG's output depends on every call made before in the process
  with concurrent.futures.ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
    futures = {split: pool.submit(_utterances, *args) for split, args in jobs.items()}
    out = {split: future.result() for split, future in futures.items()}
  path.parent.mkdir(parents=True, exist_ok=True)
  # a name of this process's own: two runs building the same set at once must not share one file
  tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
  np.savez(tmp, **{f"{split}/{k}": v for split, arrays in out.items() for k, v in arrays.items()})
  tmp.replace(path)
  return out


def utterance(arrays: dict[str, np.ndarray], i: int) -> tuple[np.ndarray, np.ndarray, str]:
  """(float32 waveform, per-sample speech mask, text) of utterance i of a split."""
  start, stop = arrays["offsets"][i], arrays["offsets"][i + 1]
  wave = arrays["audio"][start:stop].astype(np.float32) / 32767
  bins = arrays["speech_mask"][arrays["mask_offsets"][i]:arrays["mask_offsets"][i + 1]]
  mask = np.zeros(len(wave), bool)
  mask[: len(bins) * SPAN_HOP] = np.repeat(bins, SPAN_HOP)
  return wave, mask, str(arrays["text"][i])
