"""Every optimizer as a plain class; ``optim_plugins.create_optimizer`` builds them by name."""
from .adabelief import AdaBelief
from .adafactor import Adafactor
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .adamax import Adamax
from .adan import Adan
from .ademamix import AdEMAMix
from .adopt import ADOPT
from .apollo import ApolloAdamW
from .came import CAME
from .eva import Eva
from .fam import FAM
from .galore import GaLoreAdamW
from .lamb import Lamb
from .lars import Lars
from .lion import Lion
from .lookahead import Lookahead
from .lowbit import Adam4bit, Adam8bit, AdamW4bit, AdamW8bit, Lion8bit
from .maxfactor import MaxFactor
from .muon import Muon
from .nadam import NAdam
from .prodigy import Prodigy
from .radam import RAdam
from .ranger import Ranger
from .rmsprop import RMSprop
from .sam import ASAM, SAM
from .schedulefree import ScheduleFreeAdamW, ScheduleFreeSGD
from .sgd import SGD
from .signsgd import SignSGD
from .sophia import SophiaG, SophiaH
from .base import Optimizer
from .muon import muon_param_groups

__all__ = [
    "Optimizer",
    "ADOPT",
    "ASAM",
    "AdEMAMix",
    "AdaBelief",
    "Adafactor",
    "Adagrad",
    "Adam",
    "Adam4bit",
    "Adam8bit",
    "AdamW",
    "AdamW4bit",
    "AdamW8bit",
    "Adamax",
    "Adan",
    "ApolloAdamW",
    "CAME",
    "Eva",
    "FAM",
    "GaLoreAdamW",
    "Lamb",
    "Lars",
    "Lion",
    "Lion8bit",
    "Lookahead",
    "MaxFactor",
    "Muon",
    "NAdam",
    "Prodigy",
    "RAdam",
    "RMSprop",
    "Ranger",
    "SAM",
    "SGD",
    "ScheduleFreeAdamW",
    "ScheduleFreeSGD",
    "SignSGD",
    "SophiaG",
    "SophiaH",
    "muon_param_groups",
]
