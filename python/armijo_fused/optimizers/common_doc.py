"""Argument text shared by the optimizers' docstrings (written once, spliced in)."""

LINESEARCH_ARGS = r"""
        c (float, optional): Armijo sufficient-decrease constant; a trial step η is accepted when
            f(θ - η d) <= f(θ) - c η <g, d>. 0.2 is the value measured best on language modelling
            (docs/design.md §8: 0.1 is too greedy on noisy batches, 0.5 and above let η collapse)
            (default: 0.2)
        backtrack (float, optional): factor that shrinks η after a rejected trial (default: 0.5)
        growth (float, optional): factor that grows the accepted η before the next search,
            since backtracking can only shrink it (default: 1.2)
        smoothing (float, optional): s in log η̄ ← s log η̄ + (1 - s) log η_accepted; the steps
            without a search apply the smoothed η̄ and the next search starts from growth · η̄.
            A test on one noisy batch is greedy, and smoothing keeps a lucky batch's large step
            from being carried over; 0 applies the accepted step as is. Default: 0.5 for
            ArmijoAdam (measured on language modelling, bench/results/convergence_cpu.md), 0 for
            ArmijoSGD (measured on deterministic quadratics, where smoothing only slows the
            layer-wise search; set 0.5 for noisy mini-batches)
        max_trials (int, optional): trials per search; when all are rejected the step is not
            taken (θ goes back to θ0, see ``exact_revert``) and η resets to its running
            average; after a second such search in a row, the next one goes on below the
            last step size it tried (η, η̄ ← that step · backtrack / growth) (default: 20)
        max_step (float, optional): cap on the searched η, in the units η is searched in:
            along the direction, or, for ArmijoSGD with ``momentum_search="gradient"``, along
            the gradient (the step applied along the momentum direction is then at most
            (1 - μ)·max_step) (default: None)
        collapse_ratio (float, optional): an accepted η below ``collapse_ratio`` times its
            running average counts as a collapse and η is reset to the average; a second
            collapse in a row takes the small step as η and η̄ (default: 1e-2)
        max_drop (float or None, optional): the running average η̄ falls by at most this factor
            per search, so that one batch whose search backtracked far (a direction that is
            barely a descent one) does not cut the step of the steps after it; the step that
            search accepted is still taken. None: no bound. Default: 2 for ArmijoAdam (on one
            of four seeds of the language-model benchmark a single search cut η̄ 7x and the
            run ended at 1.08x the best AdamW, 0.96x with the bound: docs/results.md), None
            for ArmijoSGD (with its smoothing 0 the accepted step is applied as is; set 2 for
            noisy mini-batches)
        trend_guard (bool | None, optional): the loss-trend guard: the loss of each searched batch
            before its step (a batch the step has not yet fit) is averaged over windows of 10
            steps, the window means go into a recent and a longer running average, and where
            the recent one is above the longer one (from the sixth window on) η̄ shrinks, at
            most once per window, by growth² times what the window's other searches could have
            grown it, never below ``init_step_size``. The Armijo test on a noisy mini-batch
            passes steps that fit that batch, and η̄ can grow while the loss of the other
            batches rises: on classifiers trained for 1,500 steps with warmup + cosine, η̄ grew
            100x and the training loss ended 1.5-8x AdamW's in 11 of 12 runs; with the
            guard below it in all 12
            (docs/results.md, which also lists what it costs). A flat noisy loss sets it off
            now and then, which anneals η̄ toward its start; so does a loss that rises because
            the data drift (online learning, RL): there η̄ stayed near its start after each
            drift, and ``trend_guard=False`` let it follow (mean loss 0.42 against 0.52 on a
            drifting regression, an audit's measurement). Default: on for ArmijoAdam's
            global search (None), off with ``layerwise=True`` (on our layer-wise tasks it cost
            training loss) and for ArmijoSGD
        cadence ("adaptive" | "every" | int, optional): when to search. "every": each step; an
            int k: every k-th step; "adaptive": search while η is still moving, then every
            ``max_interval`` steps at most; after an exhausted or collapsed search the next
            step searches. Steps without a search apply the smoothed η̄ (capped at 0.5 / the
            largest weight decay, as trials are) and cost no extra forward and no host sync.
            Their length is capped at twice η̄ times the length of the direction the last
            search tested (momentum grows the direction between searches), with ‖d‖ taken from
            the previous step's pass (read on the device, no sync): a step can exceed the cap by
            the growth of ‖d‖ over one step (1.35x and 1.9x over it in two of our runs with
            momentum 0.9)
            (default: "adaptive")
        max_interval (int, optional): longest gap between searches of the adaptive cadence
            (default: 10)
        max_grad_norm (float, optional): clip the gradient that enters the direction to this
            norm. Clipping here shapes the direction only; the Armijo test keeps the true
            gradient, which external clipping would falsify; ``inf`` clips nothing but
            computes the norm (default: None)
        check_finite (bool, optional): one extra read of the gradient per step to skip steps
            whose gradient is not finite, leaving θ and the state untouched, without a host sync
            (default: True)
        backend ("auto" | "triton" | "cpp" | "torch", optional): who runs the fused passes;
            auto takes Triton on CUDA, C++ on CPU, torch otherwise (default: "auto")
        layerwise (bool, optional): one step size per block. Blocks are found from the
            parameter names (``model=`` or ``named_parameters()``: embeddings, each layer, final
            norm, head) within each param group given at construction, so two weight-decay
            groups make two blocks per layer; a group of unnamed tensors, one added later, or
            one with ``"blocks_by": "group"`` is one block (a single group of unnamed tensors
            without ``model=`` is refused: it would be one block, a global search) (``armijo_fused.blocks.
            param_groups(model)`` makes a group per layer). Step sizes, their averages and
            merges are per block in the group's lists ``step_size``, ``step_size_avg``,
            ``block_owner``; ``stats['step_size']`` is a list (default: False)
        block_search ("round_robin" | "grow_all" | "stale" | "exact", optional): layer-wise
            schedule. round_robin / stale: one block per search step (in turn / the one searched
            longest ago), tested with the combined Armijo condition over all blocks, so a search
            costs what a global one costs; if the searched block's first backtrack does not
            shrink the test's miss by the factor ``backtrack``, the blocks held fixed overshoot
            and all blocks backtrack from the first trial (once every block has passed a
            test), and after half of
            ``max_trials`` rejections all blocks backtrack. A block's η grows only on its own
            turn. grow_all: as round_robin, but
            each search first tries every block grown, together; if that trial fails, the block
            whose turn it is searches alone (the trial not counted against ``max_trials``):
            better losses from scratch and in fine-tuning, more forwards (in bench/results/:
            convergence_cpu-layerwise-grow-all.md and
            convergence_cpu-finetune-layerwise-grow-all.md). exact: every block in turn with
            the others frozen, one search per block, then one test of the combined step (all
            blocks backtrack together until it passes) (small models) (default: "round_robin")
        merge_below (float, optional): a block whose search backtracks to a step size below
            this value (a collapse; one whose first trial passes does not) merges with its
            neighbour in its param group (the previous block, else the
            next; a group that is one block does not merge) and shares one step size with it
            from then on, starting from the small one; a block that already absorbed another is
            not merged into a third, though it may absorb more, and no block merges on a search
            whose held blocks had to shrink too (the small step size was theirs). Set it well
            below the step sizes the blocks settle at: above them every block merges into one
            (a warning says so when it is at or above ``init_step_size``) (default: None, never)
        exact_revert (bool, optional): keep a copy of θ and the state during a search so that a
            closure raising mid-search restores them bitwise; otherwise θ is moved back along
            the line and the gradient taken back out of the state, exact to the float32
            rounding of the trial points θ0 − η·d: a few ulps of θ where trials stay near θ's
            scale (Adam's steps), but a trial far beyond it leaves its own rounding
            (ArmijoSGD's first trial at η = 1.2 on a gradient of 2e5: θ0 back only to about
            1e-2 on |θ| ≈ 3). Costs one copy of θ and the state per search step
            (default: False)
        process_group (optional): the group whose ranks decide together under DDP; the trial
            losses and per-block sums are averaged over it in one all-reduce per trial (and
            one per step for a given ``loss=``, each rank's own), so every rank accepts the same
            step. Used only when torch.distributed is initialised with more than one rank
            (default: None, the world; a model that is not replicated over the world, one per
            rank or stepped on one rank only, needs a group of its own ranks)
        candidates (int, optional): test this many step sizes of the backtracking sequence
            (η0, βη0, β²η0, ...) in one batched forward (torch.func.vmap over stacked trial
            weights) and accept the first that passes: the step sequential backtracking would
            accept, in fewer dependent forwards, for K times the parameter and activation memory.
            Needs ``model=``, the global search, no in-place buffer updates in the trial
            forward (a BatchNorm in training mode is refused by name; dropout works: the K
            candidates share the training forward's masks), and a loss returned as a tensor,
            read nowhere on the way (not ``loss.item()``: vmap cannot read values) (default:
            None, sequential)
        flat (bool, optional): re-point the parameters into one flat buffer per group, so one
            kernel launch covers the group. False leaves them where they are (for CUDA graphs
            captured earlier, shared storage, code that holds ``p.data``): the passes reach
            contiguous fp32 tensors through per-tile pointer tables at the same bytes per
            parameter, and copy the others in and out around each pass; ``zero_grad()`` then
            drops the gradients as torch does, so the forward runs without them, as AdamW's
            (default: True)
        model (nn.Module, optional): the model, so trial forwards restore its buffers
            (BatchNorm statistics) afterwards, and those of any other module in training mode
            the loss function reaches (a GAN's discriminator); without it, the models the
            loss function reaches are used if they hold every parameter, or else the modules
            that hold the parameters (a BatchNorm without affine parameters is then missed),
            found once (default: None)

    Every setting may be written on the optimizer later (``opt.c = 0.2``, ``opt.growth = 1.5``,
    ``opt.backend = "torch"``) and is checked where written, except ``layerwise``, ``flat`` and
    ``momentum_search`` (and ``tile``, the reduction block the base class takes): the store and
    the blocks are built from them, so they are fixed at construction (build a new optimizer and
    load the old one's ``state_dict()``). ``init_step_size``, ``direction`` and ``model`` read
    back what the constructor took; a write to them raises, saying where each is given.

    The group's ``lr`` belongs to your scheduler and is never written: the parameters move by
    η · min(1, lr_t / lr_0), where lr_0 is the schedule's peak when the group records it
    (``max_lr``: OneCycleLR), else the group's ``initial_lr`` (set by torch schedulers), else the
    ``lr`` given here. The factor is capped at 1, with a one-time warning, because a longer step
    than the searched one was never tested: give a schedule that warms up from below its peak
    (``LinearLR``, a ``LambdaLR`` multiplier ≤ 1, OneCycleLR) rather than one that raises lr above
    the lr given here. Without a scheduler the factor is 1 and the value of ``lr`` does not
    matter.
    ``lr`` may be a 0-dim tensor. A group whose lr is 0 at a step stays exactly where it is, in
    the trials too, and is left out of the Armijo test (its state still takes the gradient); a
    step where every lr is 0 (a warmup from 0) runs no search.
"""
