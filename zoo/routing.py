"""A mixture of experts' router losses in training (models/moe.py): the load-balancing loss and the router
z-loss, weighted by the model's config (aux_loss_coef, z_loss_coef), added to the language-model loss, and
logged apart from it with how the tokens spread over the experts.

    router = RouterLoss(model)             # does nothing for a model without routers
    loss = lm_loss + router.loss()         # after the forward pass that computed lm_loss
    log.write(loss=..., **router.report())  # aux_loss, z_loss, expert_share_min/max since the last report
"""
class RouterLoss:
    def __init__(self, model):
        self.model = model if callable(getattr(model, "router_losses", None)) else None
        self._reset()

    def _reset(self):
        self.aux = self.z = 0.0
        self.counts, self.steps = None, 0

    def loss(self, scale=1.0):
        """The weighted router losses of the last forward pass (times `scale`, the LM loss's share of the
        step under gradient accumulation); 0 for a model without routers."""
        if self.model is None:
            return 0.0
        c = self.model.config
        aux, z, counts = self.model.router_losses()  # counts [MoE layers, n_expert]
        self.aux, self.z = self.aux + aux.detach(), self.z + z.detach()  # no host sync until report()
        self.counts = counts if self.counts is None else self.counts + counts
        self.steps += 1
        return (c.aux_loss_coef * aux + c.z_loss_coef * z) * scale

    def report(self):
        """Means since the last report: the load-balancing loss (top_k when balanced), the z-loss, and the
        smallest and largest share of top-k picks any expert of any layer had (1 / n_expert each when
        balanced; 0 is an unused expert). {} for a model without routers or before any step."""
        if self.model is None or not self.steps:
            return {}
        share = self.counts.float() / self.counts.sum(dim=1, keepdim=True)  # [layers, n_expert]
        out = dict(aux_loss=round((self.aux / self.steps).item(), 4), z_loss=round((self.z / self.steps).item(), 4),
                   expert_share_min=round(share.min().item(), 4), expert_share_max=round(share.max().item(), 4))
        self._reset()
        return out

