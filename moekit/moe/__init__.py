"""The MoE layer, split as router -> dispatch -> experts -> combine."""

from moekit.moe.balance import bias_update, load_imbalance, router_entropy, seq_aux_loss, switch_aux_loss, z_loss
from moekit.moe.dispatch import Dispatched, Dispatcher, loop_reference
from moekit.moe.experts import DenseFFN, GroupedExperts
from moekit.moe.hypermoe import HyperNetwork
from moekit.moe.layer import MoELayer, Routing, pack_experts
from moekit.moe.router import Router, RouterOutput, route

__all__ = [
    "Dispatched", "Dispatcher", "DenseFFN", "GroupedExperts", "HyperNetwork", "MoELayer", "Router", "RouterOutput", "Routing",
    "bias_update", "load_imbalance", "loop_reference", "pack_experts", "route", "router_entropy", "seq_aux_loss",
    "switch_aux_loss", "z_loss",
]
